"""The same chunks as runner.py, scored by a Ray Data pipeline: one row per chunk, `map_batches`
over a fixed pool of model actors (one Reranker each, loaded once), results streamed back to the
driver, which saves each chunk as it arrives. The files in and out, the chunks and the scores are
the in-process job's; only where `score_chunk` runs differs.

Every worker must reach the model (a path present on every node, or a hub id) and the images
(paths on shared storage, or URLs).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from ..errors import InputError, M0liteError
from .runner import Job, Settings, load_reranker, score_chunk


class ChunkScorer:
    """A Ray Data actor: loads the model once, then scores one chunk per call."""

    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        self.rr = load_reranker(self.settings)

    def __call__(self, batch: dict) -> dict:
        results = []
        for pairs in batch["pairs"]:
            try:
                results.append(json.dumps(score_chunk(self.rr, json.loads(pairs), self.settings)))
            except M0liteError as e:  # an error of the whole chunk: handed to the driver, not raised here
                results.append(json.dumps({"failed": str(e)}))
        return {"chunk": batch["chunk"], "result": results}


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError("--ray needs Ray Data: pip install 'm0lite[ray]'") from None
    return ray


def score_chunks_on_ray(job: Job, todo: list[int], s: Settings, address: str, workers: int | None):
    """(chunk, result) for each chunk in todo, in the order they finish."""
    if not todo:
        return
    ray = _ray()
    if not ray.is_initialized():
        # "" (the flag alone): RAY_ADDRESS if set, else a local instance on this machine's cores.
        ray.init(address=address or None, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's bar counts pairs
    gpus = 1 if s.device.startswith("cuda") else 0
    cpus = s.threads or 1
    if workers is None:
        resources = ray.cluster_resources()
        workers = int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", 1) // cpus)
    if workers < 1:
        raise InputError(f"the Ray cluster has no room for a worker with {cpus} CPU(s){' and a GPU' if gpus else ''}")
    settings = {**asdict(s), "threads": cpus}
    rows = [{"chunk": c, "pairs": json.dumps(job.pairs[slice(*job.chunks[c])], ensure_ascii=False)} for c in todo]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * workers))
    ds = ds.map_batches(ChunkScorer, fn_constructor_kwargs={"settings": settings}, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))), num_cpus=cpus, num_gpus=gpus)
    for row in ds.iter_rows():
        result = json.loads(row["result"])
        if "failed" in result:
            a, b = job.chunks[row["chunk"]]
            raise M0liteError(f"chunk of {job.where[a]} .. {job.where[b - 1]}: {result['failed']}")
        yield int(row["chunk"]), result
