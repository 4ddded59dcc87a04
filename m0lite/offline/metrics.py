"""Retrieval metrics of a run against judgments, computed by ir-measures (trec_eval's definitions,
through pytrec_eval, as BEIR's own evaluation uses them).

Names are taken as BEIR and the model card write them (ndcg@10, recall@100, mrr@10, map@100,
precision@10) or in ir-measures' own syntax (nDCG@10, R@100, RR@10, AP, P@10, ...).
"""

from __future__ import annotations

import re

from ..errors import InputError

ALIASES = {"ndcg": "nDCG", "recall": "R", "r": "R", "mrr": "RR", "rr": "RR", "map": "AP", "ap": "AP",
           "precision": "P", "p": "P", "success": "Success"}


def parse_metrics(spec: str) -> list[tuple[str, object]]:
    """"ndcg@10,recall@10" -> [(label as given, ir-measures measure)]."""
    import ir_measures

    out = []
    for label in (m.strip() for m in spec.split(",")):
        if not label:
            continue
        m = re.fullmatch(r"([A-Za-z_]+)(@\d+)?", label)
        name = ALIASES.get(m[1].lower(), m[1]) + (m[2] or "") if m else label
        try:
            out.append((label, ir_measures.parse_measure(name)))
        except (ValueError, NameError, SyntaxError, TypeError, AttributeError):
            raise InputError(f"--metrics: unknown metric {label!r} (e.g. ndcg@10, recall@100, mrr@10, map@100, "
                             "precision@10, or an ir-measures name)") from None
    if not out:
        raise InputError("--metrics: give at least one metric, e.g. ndcg@10")
    return out


def evaluate(qrels: dict, run: dict, metrics: list[tuple[str, object]]) -> dict[str, float]:
    """Mean of each metric over the judged queries of a run: qrels {qid: {docid: grade}},
    run {qid: {docid: score}}."""
    import ir_measures

    values = ir_measures.calc_aggregate([m for _, m in metrics], qrels, run)
    return {label: float(values[m]) for label, m in metrics}
