"""`m0lite serve`: the HTTP reranking service.

    app.py           the FastAPI app and its routes
    dialects.py      Jina, Cohere v1/v2, TEI, vLLM and llama.cpp shapes: the one table of differences
    schema.py        request and response models (pydantic)
    guard.py         what runs before the app: timeouts, request ids and access logs, auth, body cap
    inputs.py        limits, images loaded in bounded memory, the cost of each pair
    scheduler.py     the model thread: fair passes under a token and patch budget
    explanations.py  `"explain": true`: occlusion's cost bound, explanations cut to size
    memory.py        the image memory budget, and freed memory returned to the system
    metrics.py       GET /metrics (Prometheus)
    settings.py      ServerSettings and the command line
    main.py          `serve` and `main`: load the model, run the app
"""

from .main import main, serve
from .settings import ServerSettings, add_serve_arguments


def build_app(reranker, settings=None):
    """The ASGI app (see app.py); imported on first use, so the flags work without the `serve` extra."""
    from .app import build_app as build

    return build(reranker, settings)


__all__ = ["ServerSettings", "add_serve_arguments", "build_app", "main", "serve"]
