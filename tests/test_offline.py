"""`m0lite eval` and `m0lite batch` on a tiny BEIR folder and pair tables written here, with the
tiny random checkpoint: scores equal compute_score's, metrics equal ir-measures', bad rows are
reported by file and line, a killed run resumes to byte-identical output, Ray gives the same files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m0lite.cli import main
from m0lite.offline.data import read_pairs

WORDS = ("gold rush markdown html parser river bank loan model data extraction small language page "
         "table chart invoice receipt tax law court ruling").split()
ROOT = Path(__file__).resolve().parent.parent


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def page(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def keep_threads():
    """--threads sets torch's thread count for the process; the other tests keep theirs."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    """A BEIR folder: text documents (title + text) and page images (relative paths), graded
    judgments (0, 1, 2), and a first-stage run of 12 candidates per query; q7 is unjudged."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("beir")
    (root / "pages").mkdir()
    (root / "qrels").mkdir()
    corpus, docs = [], {}
    for i in range(30):
        if i % 6 == 0:
            page(i, 60 + 7 * i, 80).save(root / "pages" / f"p{i}.png")
            corpus.append({"_id": f"d{i}", "title": "", "text": "", "image": f"pages/p{i}.png"})
            docs[f"d{i}"] = {"image": str(root / "pages" / f"p{i}.png")}
        else:
            title, text = (sentence(rng, 1, 3) if i % 4 else ""), sentence(rng, 5, 40)
            corpus.append({"_id": f"d{i}", "title": title, "text": text})
            docs[f"d{i}"] = f"{title} {text}".strip()
    queries = {f"q{q}": sentence(rng, 2, 6) for q in range(8)}
    (root / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    qrels = {}
    lines = ["query-id\tcorpus-id\tscore"]
    for q in range(7):
        for d in rng.sample(range(30), 6):
            qrels.setdefault(f"q{q}", {})[f"d{d}"] = rng.choice([0, 1, 1, 2])
            lines.append(f"q{q}\td{d}\t{qrels[f'q{q}'][f'd{d}']}")
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    run = []
    for q in range(8):
        for rank, d in enumerate(rng.sample(range(30), 12), 1):
            run.append(f"q{q} Q0 d{d} {rank} {round(30 - rank * 1.5 + rng.random(), 3)} bm25")
    rng.shuffle(run)  # the reader must sort by score, not trust the file's order
    (root / "run.trec").write_text("\n".join(run) + "\n")
    return {"root": root, "docs": docs, "queries": queries, "qrels": qrels}


def read_trec(path: Path) -> dict[str, list[tuple[str, int, float]]]:
    out = {}
    for line in path.read_text().splitlines():
        qid, _, doc, rank, score, _ = line.split()
        out.setdefault(qid, []).append((doc, int(rank), float(score)))
    return out


def first_stage_top(beir, k: int) -> dict[str, list[str]]:
    cands = {}
    for qid, doc, score in ((l.split()[0], l.split()[2], float(l.split()[4])) for l in (beir["root"] / "run.trec").read_text().splitlines()):
        cands.setdefault(qid, []).append((score, doc))
    return {q: [d for _, d in sorted(c, key=lambda t: -t[0])[:k]] for q, c in cands.items()}


def eval_args(ckpt, beir, out: Path, *extra) -> list[str]:
    return ["eval", "--model", str(ckpt), "--dtype", "float32", "--data", str(beir["root"]), "--run",
            str(beir["root"] / "run.trec"), "--out", str(out), "--top-k", "8", "--no-progress", *extra]


# ---- eval ---------------------------------------------------------------------------------------


def test_eval_scores_equal_compute_score(tiny_ckpt, tiny_reranker, beir, tmp_path):
    out = tmp_path / "reranked.trec"
    assert main(eval_args(tiny_ckpt, beir, out, "--chunk-pairs", "10")) == 0
    got, top = read_trec(out), first_stage_top(beir, 8)
    assert set(got) == set(beir["qrels"])  # q7 has no judgments: left out
    for qid, ranked in got.items():
        assert sorted(d for d, _, _ in ranked) == sorted(top[qid])
        assert [r for _, r, _ in ranked] == list(range(1, 9))
        assert [s for _, _, s in ranked] == sorted((s for _, _, s in ranked), reverse=True)
        expected = tiny_reranker.compute_score([[beir["queries"][qid], beir["docs"][d]] for d, _, _ in ranked])
        assert [s for _, _, s in ranked] == pytest.approx(expected, abs=1e-5)
    assert not out.with_name(out.name + ".parts").exists()


def test_eval_metrics_equal_ir_measures(tiny_ckpt, beir, tmp_path, capsys):
    import ir_measures

    out, metrics_out = tmp_path / "reranked.trec", tmp_path / "metrics.json"
    assert main(eval_args(tiny_ckpt, beir, out, "--metrics", "ndcg@5,recall@5,mrr@10,map@8,precision@3",
                          "--metrics-out", str(metrics_out))) == 0
    printed = capsys.readouterr().out
    got = json.loads(metrics_out.read_text())
    measures = [ir_measures.nDCG @ 5, ir_measures.R @ 5, ir_measures.RR @ 10, ir_measures.AP @ 8, ir_measures.P @ 3]
    labels = ["ndcg@5", "recall@5", "mrr@10", "map@8", "precision@3"]
    # The first stage as it was reranked: each judged query's best 8 by score.
    first_path = tmp_path / "first.trec"
    scores = {(l.split()[0], l.split()[2]): l.split()[4] for l in (beir["root"] / "run.trec").read_text().splitlines()}
    first_path.write_text("".join(f"{q} Q0 {d} {r} {scores[q, d]} bm25\n" for q, docs in first_stage_top(beir, 8).items()
                                  if q in beir["qrels"] for r, d in enumerate(docs, 1)))
    for name, run_path in (("first_stage", first_path), ("reranked", out)):
        want = ir_measures.calc_aggregate(measures, beir["qrels"], ir_measures.read_trec_run(str(run_path)))
        assert got[name] == pytest.approx({label: want[m] for label, m in zip(labels, measures)}, abs=1e-12)
        for label, m in zip(labels, measures):
            assert f"{want[m]:.4f}" in printed.split(label)[1].splitlines()[0]
    assert got["queries"] == 7


def test_eval_bad_inputs_are_named(tiny_ckpt, beir, tmp_path, capsys):
    run = tmp_path / "run.trec"
    lines = (beir["root"] / "run.trec").read_text().splitlines()
    lines[3] = "q1 Q0 d_missing 1 99.0 bm25"
    lines[5] = "q1 Q0 d1 one"
    run.write_text("\n".join(lines) + "\n")
    args = eval_args(tiny_ckpt, beir, tmp_path / "out.trec")
    args[args.index("--run") + 1] = str(run)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{run}:4: document d_missing is not in corpus.jsonl" in err
    assert f"{run}:6: expected 6 columns" in err
    assert "Traceback" not in err and not (tmp_path / "out.trec").exists()
    assert main(args + ["--skip-bad-rows"]) == 0
    got = read_trec(tmp_path / "out.trec")
    assert "d_missing" not in {d for d, _, _ in got["q1"]} and len(got["q1"]) == 7  # the top 8 less the missing one
    assert main(args + ["--metrics", "ndcg@x"]) == 2
    assert "unknown metric 'ndcg@x'" in capsys.readouterr().err


# ---- batch --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """A jsonl table: text and image documents, each scored against several queries, rows of
    each document scattered through the file; an image query; ids on some rows."""
    rng = random.Random(3)
    root = tmp_path_factory.mktemp("pairs")
    page(1, 90, 70).save(root / "a.png")
    page(2, 50, 120).save(root / "b.png")
    docs = [{"document": sentence(rng, 3, 50)} for _ in range(5)] + [{"document_image": "a.png"}, {"document_image": "b.png"},
                                                                     {"document_image": "b.png", "document": "its caption"}]
    rows = []
    for i in range(40):
        row = {"query": sentence(rng, 2, 5), **rng.choice(docs)}
        if i % 3 == 0:
            row["id"] = f"r{i}"
        rows.append(row)
    rows[11] = {"query_image": "a.png", "document": docs[0]["document"], "id": 11}
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_input(row: dict, base: Path):
    if "document_image" in row:
        image = {"image": str(base / row["document_image"])}
        return {**image, "text": row["document"]} if "document" in row else image
    return row["document"]


def batch_args(ckpt, inp: Path, out: Path, *extra) -> list[str]:
    return ["batch", "--model", str(ckpt), "--dtype", "float32", "--input", str(inp), "--output", str(out),
            "--no-progress", *extra]


def test_batch_scores_equal_compute_score(tiny_ckpt, tiny_reranker, pairs_file, tmp_path):
    out = tmp_path / "scores.jsonl"
    assert main(batch_args(tiny_ckpt, pairs_file, out, "--chunk-pairs", "7", "--batch-size", "4")) == 0
    rows = [json.loads(l) for l in pairs_file.read_text().splitlines()]
    got = [json.loads(l) for l in out.read_text().splitlines()]
    assert [g["row"] for g in got] == list(range(1, len(rows) + 1))  # input order, whatever the grouping
    assert [g.get("id") for g in got] == [r.get("id") for r in rows]
    pairs = [[{"image": str(pairs_file.parent / r["query_image"])} if "query_image" in r else r["query"],
              as_input(r, pairs_file.parent)] for r in rows]
    assert [g["score"] for g in got] == pytest.approx(tiny_reranker.compute_score(pairs), abs=1e-5)
    raw = tmp_path / "raw.jsonl"
    assert main(batch_args(tiny_ckpt, pairs_file, raw, "--raw")) == 0
    assert [json.loads(l)["score"] for l in raw.read_text().splitlines()] == pytest.approx(
        tiny_reranker.compute_score(pairs, normalize_scores=False), abs=1e-4)


def test_pair_rows_take_documents_of_an_image_and_text(tmp_path):
    rows = [{"query": "q", "document": {"image": "a.png", "text": "its caption"}},
            {"query": "q", "document": "its caption", "document_image": "a.png"},
            {"query": {"image": "a.png", "text": "t"}, "document": "d"},  # a query is text or an image
            {"query": "q", "document": {"image": "a.png", "text": "t"}, "document_image": "b.png"}]
    inp = tmp_path / "pairs.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page(1, 90, 70).save(tmp_path / "a.png")
    pairs, bad = read_pairs(inp)
    want = {"image": str((tmp_path / "a.png").resolve()), "text": "its caption"}
    assert [p.document for p in pairs] == [want, want]
    assert [b.line for b in bad] == [3, 4] and "'query' as an object" in bad[0].message


def test_batch_parquet_in_and_out(tiny_ckpt, pairs_file, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(l) for l in pairs_file.read_text().splitlines()]
    cols = ("query", "query_image", "document", "document_image")
    table = pa.table({c: [r.get(c) for r in rows] for c in cols} | {"id": [None if r.get("id") is None else str(r["id"]) for r in rows]})
    inp = tmp_path / "pairs.parquet"
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes((pairs_file.parent / name).read_bytes())
    pq.write_table(table, inp)
    assert main(batch_args(tiny_ckpt, inp, tmp_path / "s.parquet")) == 0
    assert main(batch_args(tiny_ckpt, pairs_file, tmp_path / "s.jsonl")) == 0
    got = pq.read_table(tmp_path / "s.parquet").to_pylist()
    want = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [g["score"] for g in got] == [w["score"] for w in want]
    assert [g["id"] for g in got] == [table["id"][i].as_py() for i in range(len(rows))]


def test_batch_bad_rows_fatal_or_skipped(tiny_ckpt, pairs_file, tmp_path, capsys):
    lines = pairs_file.read_text().splitlines()
    lines[4] = "{not json"
    lines[9] = json.dumps({"query": "q", "query_image": "a.png", "document": "d"})
    lines[20] = json.dumps({"query": "q", "document_image": "no-such-page.png"})
    inp = tmp_path / "pairs.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    (tmp_path / "a.png").write_bytes((pairs_file.parent / "a.png").read_bytes())
    (tmp_path / "b.png").write_bytes((pairs_file.parent / "b.png").read_bytes())
    out = tmp_path / "s.jsonl"
    assert main(batch_args(tiny_ckpt, inp, out)) == 2
    err = capsys.readouterr().err
    assert f"{inp}:5: not JSON" in err and f"{inp}:10: give exactly one of 'query' and 'query_image'" in err
    assert "Traceback" not in err and not out.exists()

    lines[4] = lines[9] = lines[0]  # only the missing image is left; it is found when scoring
    inp.write_text("\n".join(lines) + "\n")
    assert main(batch_args(tiny_ckpt, inp, out, "--chunk-pairs", "5")) == 2
    err = capsys.readouterr().err
    assert f"{inp}:21: document" in err and "no-such-page.png" in err and not out.exists()
    parts = out.with_name(out.name + ".parts")
    assert parts.is_dir()  # the chunks before the bad row stay, for a resume
    # A resume with other settings is refused, naming them.
    assert main(batch_args(tiny_ckpt, inp, out, "--chunk-pairs", "5", "--batch-size", "3")) == 2
    assert "differs in: batch_size" in capsys.readouterr().err
    assert main(batch_args(tiny_ckpt, inp, out, "--chunk-pairs", "5", "--skip-bad-rows")) == 2
    assert "differs in: skip_bad_rows" in capsys.readouterr().err
    for p in parts.iterdir():
        p.unlink()
    parts.rmdir()
    assert main(batch_args(tiny_ckpt, inp, out, "--chunk-pairs", "5", "--skip-bad-rows")) == 0
    err = capsys.readouterr().err
    assert f"skipped {inp}:21: document" in err
    got = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(got) == len(lines) and got[20]["score"] is None and "no-such-page.png" in got[20]["error"]
    assert all(g["score"] is not None for i, g in enumerate(got) if i != 20)


# ---- resume after a kill ------------------------------------------------------------------------


def run_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "m0lite", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_halfway(args: list[str], out: Path, chunks: int) -> int:
    """Start the job, SIGKILL it once some but not all of its chunks are saved; return how many were."""
    parts = out.with_name(out.name + ".parts")
    proc = run_cli(args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(parts.glob("chunk-*.json"))) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the job ended before it could be killed: {proc.stderr.read()[-2000:]}"
    done = len(list(parts.glob("chunk-*.json")))
    assert not out.exists() and 2 <= done < chunks
    return done


@pytest.mark.parametrize("kind", ["batch", "eval"])
def test_killed_run_resumes_to_identical_output(kind, tiny_ckpt, beir, pairs_file, tmp_path):
    def args(out):
        common = ["--chunk-pairs", "2", "--threads", "1", "--skip-bad-rows"]
        if kind == "batch":
            return batch_args(tiny_ckpt, pairs_file, out, *common)
        return eval_args(tiny_ckpt, beir, out, *common, "--chunk-pairs", "8")

    whole, resumed = tmp_path / "whole.out", tmp_path / "resumed.out"
    if kind == "batch":
        whole, resumed = whole.with_suffix(".jsonl"), resumed.with_suffix(".jsonl")
    proc = run_cli(args(whole))
    assert proc.wait() == 0, proc.stderr.read()
    chunks = 20 if kind == "batch" else 7
    kill_halfway(args(resumed), resumed, chunks)
    proc = run_cli(args(resumed))
    assert proc.wait() == 0, proc.stderr.read()
    assert "resuming" in proc.stderr.read()
    assert resumed.read_bytes() == whole.read_bytes()
    assert not resumed.with_name(resumed.name + ".parts").exists()


# ---- PDF documents ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("pypdfium2")
    from m0lite.fixtures.pdfs import picture_pdf

    root = tmp_path_factory.mktemp("pdfs")
    (root / "docs").mkdir()
    (root / "docs" / "report.pdf").write_bytes(picture_pdf([(300, 420), (420, 300), (300, 300)], seed=5))
    return root


def test_batch_rows_take_pdfs(tiny_ckpt, tiny_reranker, report, tmp_path):
    import base64

    import pyarrow.parquet as pq

    path = report / "docs" / "report.pdf"
    uri = "data:application/pdf;base64," + base64.b64encode(path.read_bytes()).decode()
    rows = [{"query": "revenue", "document_pdf": "docs/report.pdf"},
            {"query": "revenue", "document_pdf": "docs/report.pdf", "pages": "2-3", "id": 7},
            {"query": "revenue", "document_pdf": uri, "pages": 3},
            {"query": "revenue", "document": {"pdf": "docs/report.pdf", "pages": "1"}},
            {"query": "revenue", "document": "a text"},
            {"query": "revenue", "document_pdf": "docs/report.pdf", "pages": "9"},  # past the end: this row only
            {"query": "revenue", "document": "a text", "pages": "1"}]  # pages without a PDF: unreadable
    inp = report / "pairs.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    assert main(batch_args(tiny_ckpt, inp, out, "--skip-bad-rows", "--chunk-pairs", "2")) == 0
    got = [json.loads(l) for l in out.read_text().splitlines()]
    docs = [{"pdf": str(path)}, {"pdf": str(path), "pages": "2-3"}, {"pdf": uri, "pages": 3},
            {"pdf": str(path), "pages": "1"}, "a text"]
    for g, d in zip(got, docs):
        (want,) = tiny_reranker.rank("revenue", [d])
        assert g["score"] == pytest.approx(want["relevance_score"], abs=1e-5)
        assert [p["page"] for p in g.get("pages", [])] == [p["page"] for p in want.get("pages", [])]
    assert len(got[0]["pages"]) == 3 and "pages" not in got[4]
    assert got[5]["score"] is None and "pages '9': page 9 asked for, the PDF has 3 pages" in got[5]["error"]
    assert "pairs[" not in got[5]["error"] and got[5]["error"].startswith("document")
    assert got[6]["score"] is None and "'pages' goes with 'document_pdf' only" in got[6]["error"]
    assert main(batch_args(tiny_ckpt, inp, tmp_path / "scores.parquet", "--skip-bad-rows", "--chunk-pairs", "2")) == 0
    table = pq.read_table(tmp_path / "scores.parquet").to_pylist()
    assert [t["score"] for t in table] == [g["score"] for g in got]
    assert [None if t["pages"] is None else json.loads(t["pages"]) for t in table] == [g.get("pages") for g in got]


def test_eval_corpus_rows_take_pdf_pages(tiny_ckpt, tiny_reranker, report, tmp_path):
    """A ViDoRe-style set of pages: each corpus row one page of a PDF."""
    root = report / "beir"
    (root / "qrels").mkdir(parents=True)
    corpus = [{"_id": f"p{n}", "pdf": "../docs/report.pdf", "pages": str(n)} for n in (1, 2, 3)]
    corpus.append({"_id": "whole", "pdf": "../docs/report.pdf"})
    (root / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "revenue"}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\tp2\t1\n")
    (root / "run.trec").write_text("".join(f"q Q0 {c['_id']} {r} {10 - r} bm25\n" for r, c in enumerate(corpus, 1)))
    out = tmp_path / "out.trec"
    assert main(eval_args(tiny_ckpt, {"root": root}, out)) == 0
    got = {doc: score for doc, _, score in read_trec(out)["q"]}
    path = str(report / "docs" / "report.pdf")
    want = tiny_reranker.compute_score([["revenue", {"pdf": path, "pages": str(n)}] for n in (1, 2, 3)]
                                       + [["revenue", {"pdf": path}]])
    assert [got[k] for k in ("p1", "p2", "p3", "whole")] == pytest.approx(want, abs=1e-5)
    assert got["whole"] == pytest.approx(max(got["p1"], got["p2"], got["p3"]), abs=1e-6)


# ---- Ray ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")  # raised inside Ray Data, not by m0lite
def test_ray_gives_the_same_files(local_ray, tiny_ckpt, beir, pairs_file, tmp_path):
    for name, args in (("scores.jsonl", lambda o: batch_args(tiny_ckpt, pairs_file, o, "--chunk-pairs", "6")),
                       ("run.trec", lambda o: eval_args(tiny_ckpt, beir, o, "--chunk-pairs", "16"))):
        here, there = tmp_path / f"here-{name}", tmp_path / f"ray-{name}"
        assert main(args(here) + ["--threads", "1"]) == 0
        assert main(args(there) + ["--threads", "1", "--ray", "--ray-workers", "2"]) == 0
        assert there.read_bytes() == here.read_bytes()
