"""`m0lite eval` (rerank a first-stage run over a BEIR folder, with metrics) and `m0lite batch`
(score a table of pairs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError, M0liteError
from .data import BadRow, Candidate, read_beir, read_pairs, read_run, trec_lines, write_scores, write_text_atomic
from .runner import Job, Settings, run_job

MAX_LISTED = 20  # bad rows printed one by one; past that, counted


def add_offline_commands(sub) -> None:
    from ..options import add_model_arguments

    p = sub.add_parser("eval", help="rerank a first-stage TREC run over a BEIR folder and print its metrics")
    add_model_arguments(p)
    p.add_argument("--data", required=True, type=Path, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    p.add_argument("--run", required=True, type=Path, help="first-stage run, TREC format (qid Q0 docid rank score tag)")
    p.add_argument("--out", required=True, type=Path, help="the reranked run, TREC format")
    p.add_argument("--split", default="test", help="which qrels/SPLIT.tsv (default: test)")
    p.add_argument("--top-k", type=int, default=100, help="rerank each query's best K first-stage documents (default: 100)")
    p.add_argument("--metrics", default="ndcg@10,recall@10,mrr@10", help="comma-separated (default: ndcg@10,recall@10,mrr@10)")
    p.add_argument("--metrics-out", type=Path, help="also write the metrics as JSON here")
    p.add_argument("--tag", default="m0lite", help="the run tag in the last column (default: m0lite)")
    _add_job_arguments(p, doc_cache_mb=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("batch", help="score a .jsonl or .parquet table of (query, document) pairs")
    add_model_arguments(p)
    p.add_argument("--input", required=True, type=Path, help="pairs: rows with query|query_image, document|document_image|document_pdf (+ pages), id (optional)")
    p.add_argument("--output", required=True, type=Path, help="scores, .jsonl or .parquet: one row per input row, in input order")
    _add_job_arguments(p, doc_cache_mb=1024)
    p.set_defaults(func=cmd_batch)


def _add_job_arguments(p: argparse.ArgumentParser, doc_cache_mb: int) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass (default: 32)")
    g.add_argument("--max-length", type=int, default=10240)
    g.add_argument("--max-query-length", type=int, default=512)
    g.add_argument("--raw", action="store_true", help="raw scores instead of sigmoid(raw - 2.65)")
    g.add_argument("--doc-cache-mb", type=int, default=doc_cache_mb,
                   help=f"document key/value cache (0: off; default: {doc_cache_mb})")
    g.add_argument("--vision-cache-mb", type=int, default=256, help="visual-token cache (default: 256)")
    g.add_argument("--chunk-pairs", type=int, default=256,
                   help="pairs per saved chunk: what a killed run loses at most (default: 256)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (per worker with --ray; default: all cores, 1 on Ray)")
    g.add_argument("--skip-bad-rows", action="store_true", help="report bad rows and go on (default: stop at the first)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("ray")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run as a Ray Data job: on the cluster at ADDRESS, or without one on RAY_ADDRESS or a local instance")
    g.add_argument("--ray-workers", type=int, default=None, help="model actors (default: one per GPU, or per --threads CPUs)")


def _settings(args) -> Settings:
    if args.chunk_pairs < 1:
        raise InputError(f"--chunk-pairs must be at least 1, got {args.chunk_pairs}")
    return Settings(model=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                    max_length=args.max_length, max_query_length=args.max_query_length, normalize=not args.raw,
                    doc_cache_mb=args.doc_cache_mb, vision_cache_mb=args.vision_cache_mb,
                    skip_bad_rows=args.skip_bad_rows, threads=args.threads)


def report_bad(bad: list[BadRow], skip: bool, stage: str) -> None:
    """Print bad rows; without --skip-bad-rows, stop."""
    if not bad:
        return
    for b in bad[:MAX_LISTED]:
        print(f"m0lite: {'skipped ' if skip else ''}{b}", file=sys.stderr)
    if len(bad) > MAX_LISTED:
        print(f"m0lite: ... and {len(bad) - MAX_LISTED} more bad rows", file=sys.stderr)
    if not skip:
        raise M0liteError(f"{len(bad)} bad row(s) in the {stage} (listed above; --skip-bad-rows skips them)")


def _run(job: Job, args, out: Path):
    score = None
    if args.ray is not None:  # "" for a local instance or RAY_ADDRESS
        from .ray_job import score_chunks_on_ray

        def score(job, todo, s):
            return score_chunks_on_ray(job, todo, s, args.ray, args.ray_workers)
    return run_job(job, _settings(args), out, score=score, progress=not args.no_progress)


# ---- eval ---------------------------------------------------------------------------------------


def cmd_eval(args) -> None:
    from .metrics import evaluate, parse_metrics

    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    metrics = parse_metrics(args.metrics)  # before hours of scoring, not after
    if not args.run.is_file():
        raise InputError(f"{args.run}: no such run file")
    run, bad = read_run(args.run)
    top = {qid: cands[: args.top_k] for qid, cands in run.items()}
    beir = read_beir(args.data, args.split, {c.doc_id for cands in top.values() for c in cands})
    bad += beir.bad
    judged = {qid: cands for qid, cands in top.items() if qid in beir.qrels}
    if len(judged) < len(top):
        print(f"m0lite: {len(top) - len(judged)} of the run's {len(top)} queries have no judgments in "
              f"qrels/{args.split}.tsv and are left out", file=sys.stderr)
    if not judged:
        raise InputError(f"{args.run}: none of its queries is judged in {args.data}/qrels/{args.split}.tsv")

    job = Job("eval", options={"top_k": args.top_k})
    kept: dict[str, list[Candidate]] = {}  # per query, the candidates sent to the reranker, in job order
    for qid, cands in judged.items():
        if qid not in beir.queries:
            bad.append(BadRow(f"{args.run}:{cands[0].line}", f"query {qid} is not in queries.jsonl"))
            continue
        for c in cands:
            if c.doc_id not in beir.corpus:
                bad.append(BadRow(f"{args.run}:{c.line}", f"document {c.doc_id} is not in corpus.jsonl"))
                continue
            job.add(beir.queries[qid], beir.corpus[c.doc_id], f"{args.run}:{c.line}")
            kept.setdefault(qid, []).append(c)
    report_bad(bad, args.skip_bad_rows, "inputs")
    starts, i = set(), 0
    for cands in kept.values():
        starts.add(i)
        i += len(cands)
    job.cut(lambda i: i in starts, args.chunk_pairs)  # a query's candidates stay in one chunk

    result = _run(job, args, args.out)
    lines, reranked, i = [], {}, 0
    for qid, cands in kept.items():
        scored = [(c.doc_id, s, n) for n, (c, s) in enumerate(zip(cands, result.scores[i:i + len(cands)])) if s is not None]
        i += len(cands)
        scored.sort(key=lambda t: (-t[1], t[2]))  # ties keep the first stage's order
        lines.append(trec_lines(qid, [(d, s) for d, s, _ in scored], args.tag))
        reranked[qid] = {d: s for d, s, _ in scored}
    write_text_atomic(args.out, "".join(lines))
    result.state.remove()

    # Both runs over the same queries and candidates: the first stage's top-k as read.
    first = {qid: {c.doc_id: c.score for c in judged[qid]} for qid in kept}
    qrels = {qid: beir.qrels[qid] for qid in kept}
    table = {"first_stage": evaluate(qrels, first, metrics), "reranked": evaluate(qrels, reranked, metrics)}
    print(f"{len(kept)} queries, top {args.top_k}: {len(job.pairs)} pairs, {len(result.bad)} failed to score; reranked run: {args.out}")
    width = max(len(label) for label, _ in metrics)
    print(f"{'metric':<{width}}  {'first stage':>11}  {'reranked':>9}")
    for label, _ in metrics:
        print(f"{label:<{width}}  {table['first_stage'][label]:>11.4f}  {table['reranked'][label]:>9.4f}")
    if args.metrics_out:
        write_text_atomic(args.metrics_out, json.dumps({"queries": len(kept), "top_k": args.top_k, **table}, indent=1) + "\n")


# ---- batch --------------------------------------------------------------------------------------


def cmd_batch(args) -> None:
    from .data import pairs_format

    pairs_format(args.output)  # a bad output name fails now, not after the scoring
    pairs, bad = read_pairs(args.input)
    report_bad(bad, args.skip_bad_rows, "input")
    # Rows grouped by document, groups in order of first appearance: a document's queries then run
    # together, so its keys and values are computed once (the document cache) and its image encoded once.
    groups: dict[str, list[int]] = {}
    for k, p in enumerate(pairs):
        groups.setdefault(json.dumps(p.document, sort_keys=True, ensure_ascii=False), []).append(k)
    order = [k for ks in groups.values() for k in ks]
    job = Job("batch")
    for k in order:
        job.add(pairs[k].query, pairs[k].document, f"{args.input}:{pairs[k].row}")
    job.cut(lambda i: True, args.chunk_pairs)

    result = _run(job, args, args.output)
    errors = {b.where: b.message for b in result.bad}
    rows = {b.where: {"row": b.line, "id": None, "score": None, "error": b.message} for b in bad}
    for k, score, pages in zip(order, result.scores, result.pages):
        p, where = pairs[k], f"{args.input}:{pairs[k].row}"
        rows[where] = {"row": p.row, "id": p.id, "score": score, "error": errors.get(where), "pages": pages}
    write_scores(args.output, sorted(rows.values(), key=lambda r: r["row"]))
    result.state.remove()
    print(f"{len(rows)} rows: {len(pairs) - len(result.bad)} scored, {len(result.bad)} failed to score, "
          f"{len(bad)} unreadable; scores: {args.output}", file=sys.stderr)
