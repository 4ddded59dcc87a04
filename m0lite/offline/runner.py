"""A resumable scoring job: pairs cut into chunks, each chunk scored by one `compute_score` call and
saved on its own, the output assembled from the saved chunks at the end.

What makes a resumed run's output byte-identical to an uninterrupted one:
- a chunk's scores depend on the chunk alone: the chunks are fixed by the inputs and settings, the
  caches are emptied before each chunk (a cached entry computed in another batch may differ from a
  fresh one in the last bit), and the weights are packed before the first chunk (packing mid-run
  would change the rounding of every later score, at a point that moves with where a run resumed);
- a chunk is saved atomically (written aside, then renamed) with its scores as exact floats;
- the state folder's manifest holds the settings and a digest of the pairs, and a resume with
  other arguments or inputs is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..documents import result_fields
from ..errors import InputError, M0liteError
from .data import BadRow

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Settings:
    """How pairs are scored: what from_pretrained and compute_score are given."""

    model: str
    device: str = "cpu"
    dtype: str | None = None  # None: the Reranker's default for the device
    batch_size: int = 32
    max_length: int = 10240
    max_query_length: int = 512
    normalize: bool = True
    doc_cache_mb: int = 0
    vision_cache_mb: int = 256
    skip_bad_rows: bool = False
    threads: int | None = None  # torch threads per process (Ray: per worker); None: all cores here, 1 on Ray

    def check(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_length < 2 or not 0 < self.max_query_length < self.max_length:
            raise InputError(f"need 0 < --max-query-length ({self.max_query_length}) < --max-length ({self.max_length})")
        if self.doc_cache_mb < 0 or self.vision_cache_mb < 0:
            raise InputError("cache sizes cannot be negative")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be at least 1, got {self.threads}")

    def manifest(self, threads: int) -> dict:
        """What decides the scores' bits. The thread count does too: a matmul split over more threads
        may add its terms in another order."""
        return {**asdict(self), "model": model_identity(self.model), "threads": threads}


def model_identity(model: str) -> dict | str:
    """A local checkpoint by its config's digest and its weight files' sizes (hashing gigabytes of
    weights at every start would cost more than it guards); a hub id by its name."""
    folder = Path(model)
    if not (folder / "config.json").is_file():
        return model
    return {"config_sha256": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
            "weights": {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}}


@dataclass
class Job:
    """Pairs in the order they are scored, where each came from, and the chunks: consecutive
    [start, end) ranges of the pairs."""

    kind: str  # "eval" or "batch"
    pairs: list[list] = field(default_factory=list)  # [query, document], each a str or {"image": ...}
    where: list[str] = field(default_factory=list)  # "file:line" of each pair
    chunks: list[tuple[int, int]] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # command options that shape the output (top_k, ...)

    def add(self, query, document, where: str) -> None:
        self.pairs.append([query, document])
        self.where.append(where)

    def cut(self, boundaries_ok, chunk_pairs: int) -> None:
        """Chunks of about chunk_pairs pairs, cut only where boundaries_ok(i) allows a chunk to start
        at pair i (a chunk holds at least one whole unit however large)."""
        start = 0
        for i in range(1, len(self.pairs)):
            if i - start >= chunk_pairs and boundaries_ok(i):
                self.chunks.append((start, i))
                start = i
        if self.pairs:
            self.chunks.append((start, len(self.pairs)))

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.kind, self.chunks, self.options], sort_keys=True).encode())
        for pair, where in zip(self.pairs, self.where):
            h.update(json.dumps([pair, where], ensure_ascii=False, sort_keys=True).encode())
            h.update(b"\n")
        return h.hexdigest()


# ---- scoring one chunk ------------------------------------------------------------------------

_BAD_PAIR = re.compile(r"pairs\[(\d+)\] ((?:query|document)\b.*)", re.S)


def load_reranker(s: Settings):
    from m0lite import Reranker
    import torch

    if s.threads:
        torch.set_num_threads(s.threads)
    rr = Reranker.from_pretrained(s.model, device=s.device, dtype=s.dtype, doc_cache_bytes=s.doc_cache_mb * 2**20,
                                  vision_cache_bytes=s.vision_cache_mb * 2**20)
    rr.pack()  # see the module docstring
    return rr


def score_chunk(rr, pairs: list[list], s: Settings) -> dict:
    """{"scores": [float or None], "pages": [list or None], "errors": [[index, message]]} for one chunk's
    pairs ("pages": a PDF document's best pages, as Reranker.rank gives them); in fatal mode
    {"fatal": [index, message]} at the first bad pair. A pair the Reranker refuses (its errors name
    the pair as `pairs[i] ...`) is taken out and the rest scored again without it."""
    live = list(range(len(pairs)))
    errors = []
    while live:
        for cache in (rr.doc_cache, rr.vision_cache):
            if cache is not None:
                cache.clear()
        try:
            # score_pairs scores as compute_score does (the same document budget), and with details says
            # which parts of a document (a PDF's pages) scored what.
            scored, _ = rr.score_pairs([pairs[i] for i in live], s.normalize, batch_size=s.batch_size,
                                       max_length=s.max_length, max_query_length=s.max_query_length, details=True)
            break
        except InputError as e:
            m = _BAD_PAIR.match(str(e))
            if m is None:
                raise
            index = live.pop(int(m[1]))
            bad = [index, m[2]]
            if not s.skip_bad_rows:
                return {"fatal": bad}
            errors.append(bad)
    else:
        scored = []
    out, pages = [None] * len(pairs), [None] * len(pairs)
    for i, (score, parts) in zip(live, scored):
        out[i] = score
        pages[i] = result_fields(parts).get("pages")
    return {"scores": out, "pages": pages, "errors": sorted(errors)}


def score_chunks_here(job: Job, todo: list[int], s: Settings):
    """(chunk, result) for each chunk in todo, scored in this process (the model loaded only if
    there is something to score)."""
    rr = load_reranker(s) if todo else None
    for c in todo:
        a, b = job.chunks[c]
        yield c, score_chunk(rr, job.pairs[a:b], s)


# ---- the state folder ---------------------------------------------------------------------------


class State:
    """OUT.parts/: manifest.json and one chunk-NNNNNN.json per finished chunk."""

    def __init__(self, out: Path):
        self.dir = out.with_name(out.name + ".parts")

    def _chunk(self, c: int) -> Path:
        return self.dir / f"chunk-{c:06d}.json"

    def open(self, manifest: dict) -> set[int]:
        """Start or resume; returns the finished chunks."""
        path = self.dir / "manifest.json"
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = None
            if old != manifest:
                differs = sorted(k for k in set(manifest) | set(old or {}) if (old or {}).get(k) != manifest.get(k))
                raise M0liteError(f"{self.dir} holds a run started with other arguments or inputs (differs in: "
                                  f"{', '.join(differs)}); rerun with those, or delete {self.dir} to start over")
            done = set()
            for p in self.dir.glob("chunk-*.json"):
                done.add(int(p.stem.split("-")[1]))
            return done
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(manifest, indent=1, sort_keys=True))
        return set()

    def save(self, c: int, result: dict) -> None:
        _write_atomic(self._chunk(c), json.dumps(result))

    def load(self, c: int) -> dict:
        return json.loads(self._chunk(c).read_text(encoding="utf-8"))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- running a job ------------------------------------------------------------------------------


@dataclass
class Result:
    scores: list  # per pair of the job: float, or None where the pair was bad
    pages: list  # per pair of the job: a PDF document's best pages ([{page, relevance_score}]), else None
    bad: list[BadRow]  # the pairs skipped, in the job's order
    state: State


def run_job(job: Job, s: Settings, out: Path, *, score=None, progress: bool = True) -> Result:
    """Score every chunk not yet saved under OUT.parts, then gather all chunks' scores. `score`: a function
    (job, chunks, settings) -> (chunk, result) pairs that scores them elsewhere (ray_job.score_chunks_on_ray,
    one thread per worker unless --threads); by default they are scored in this process. The caller writes
    OUT and then removes the state (result.state.remove())."""
    s.check()
    state = State(out)
    if score is not None:
        threads = s.threads or 1
    else:
        import torch
        threads = s.threads or torch.get_num_threads()
    done = state.open({"version": MANIFEST_VERSION, "kind": job.kind, "inputs": job.digest(), **s.manifest(threads)})
    todo = [c for c in range(len(job.chunks)) if c not in done]
    from tqdm.auto import tqdm

    def size(c: int) -> int:
        return job.chunks[c][1] - job.chunks[c][0]

    # Always pairs/s (tqdm would flip a slow rate to s/pair), and the time left.
    bar = tqdm(total=len(job.pairs), initial=sum(size(c) for c in done), unit=" pairs", desc=job.kind, file=sys.stderr,
               disable=not progress, dynamic_ncols=True, smoothing=0.05,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} pairs [{elapsed}<{remaining}, {rate_noinv_fmt}]")
    if done:
        bar.write(f"resuming {state.dir}: {len(done)} of {len(job.chunks)} chunks already done", file=sys.stderr)
    results = (score or score_chunks_here)(job, todo, s)
    try:
        for c, result in results:
            a = job.chunks[c][0]
            if "fatal" in result:
                i, message = result["fatal"]
                raise M0liteError(f"{job.where[a + i]}: {message} (--skip-bad-rows skips such rows; the chunks "
                                  f"done so far stay in {state.dir})")
            state.save(c, result)
            for i, message in result["errors"]:
                bar.write(f"m0lite: skipped {job.where[a + i]}: {message}", file=sys.stderr)
            bar.update(size(c))
    finally:
        bar.close()
        if hasattr(results, "close"):
            results.close()
    scores, pages, bad = [None] * len(job.pairs), [None] * len(job.pairs), []
    for c, (a, b) in enumerate(job.chunks):
        result = state.load(c)
        scores[a:b] = result["scores"]
        pages[a:b] = result.get("pages") or [None] * (b - a)
        for i, message in result["errors"]:
            bad.append(BadRow(job.where[a + i], message))
            if c in done:  # skipped by an earlier run of this job: said again, so no report misses it
                print(f"m0lite: skipped {bad[-1]} (in an earlier run)", file=sys.stderr)
    return Result(scores, pages, bad, state)
