"""Explanations in a rerank answer: what occlusion may cost a request, what each costs a pass, each cut to size.

A Jina-shape request with `"explain": true` gets, in each result it returns (after top_n, so a request
pays only for what it reads), the dict `Reranker.explain` gives for that pair, made on the model thread
like the scores (`Scheduler.explain`). `"explain_method"` is "attention" by default (one pass per
result, about what scoring it cost) or "occlusion" (the score lost without each part: one decoder pass
per text token and image region).

Two bounds:
- size: each explanation keeps its `max_explanation_parts` strongest text tokens (by |score|) and, apart,
  its strongest regions, in document order, with the counts of those left out (`text_omitted`,
  `regions_omitted`); the scores of what is kept are unchanged.
- cost: occlusion's passes grow with the parts, and their lengths with the prompt; a request may ask it
  for documents of at most `max_occlusion_parts` prompt tokens in all (413 beyond, naming the flag),
  estimated before scoring as the loader estimates them. Which documents are explained is known only
  after scoring, so the count takes the largest ones.

Region boxes are in the pixels of the image as the client sent it: the server resizes images at load,
so `Reranker.explain` saw the resized one.
"""

from __future__ import annotations

from .dialects import Task
from .inputs import RequestTooLarge
from .scheduler import Cost


def check_occlusion(task: Task, costs: list[Cost], limit: int) -> None:
    """413 if occlusion over the documents the task may explain would pass `limit` prompt tokens."""
    if task.explain != "occlusion":
        return
    n = min(task.top_n or len(costs), len(costs))
    tokens = sum(sorted((c.tokens for c in costs), reverse=True)[:n])
    if tokens > limit:
        raise RequestTooLarge(f"explain_method 'occlusion': the {n} documents to explain have about {tokens:,} "
                              f"prompt tokens, over the limit of {limit:,} per request (--max-occlusion-parts); "
                              f"ask fewer with top_n, or explain_method 'attention'")


def explain_cost(cost: Cost, method: str, pass_tokens: int) -> Cost:
    """What explaining a pair costs the scheduler. An explanation makes model passes of its own, so it takes
    a scheduler pass alone (at least the whole budget of `pass_tokens`), which keeps a small request's wait
    to about one explanation; its size orders it among the others (shortest first): attention, one pass of
    the prompt; occlusion, one per part, each from the part's place on, about half the prompt."""
    tokens = cost.tokens if method == "attention" else cost.tokens + cost.tokens * cost.tokens // 2
    return Cost(max(tokens, pass_tokens), cost.patches)


def bounded(explanation: dict, most: int, size: tuple[int, int] | None) -> dict:
    """`explanation` with its most strongly attributed `most` text tokens and regions, and region boxes in
    an image of `size` (width, height) pixels, the size it was sent at."""
    text, left = _strongest(explanation["text"], most)
    out = {**explanation, "text": text, "text_omitted": left}
    image = explanation["image"]
    if image is not None:
        regions, left = _strongest(image["regions"], most)
        width, height = size or (image["width"], image["height"])
        sx, sy = width / image["width"], height / image["height"]
        regions = [{**r, "box": [r["box"][0] * sx, r["box"][1] * sy, r["box"][2] * sx, r["box"][3] * sy]}
                   for r in regions]
        out["image"] = {**image, "width": width, "height": height, "regions": regions, "regions_omitted": left}
    return out


def _strongest(parts: list[dict], most: int) -> tuple[list[dict], int]:
    """The `most` parts of largest |score|, in their order, and how many were left out."""
    keep = sorted(sorted(range(len(parts)), key=lambda i: -abs(parts[i]["score"]))[:most])
    return [parts[i] for i in keep], len(parts) - len(keep)
