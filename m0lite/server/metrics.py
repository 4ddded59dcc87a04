"""`GET /metrics`: the server's counters in the Prometheus text format (prometheus-client).

Each app has its own registry, so several apps in one process (tests) never
share counts. The caches are read when scraped, by a collector, rather than
counted twice.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, reranker: Any = None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("m0lite_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("m0lite_request_duration_seconds", "Time from arrival to the end of the answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.pass_pairs = Histogram("m0lite_batch_pairs", "Pairs per model pass", buckets=PAIR_BUCKETS, registry=r)
        self.pass_tokens = Histogram("m0lite_batch_tokens", "Prompt tokens per model pass", buckets=TOKEN_BUCKETS,
                                     registry=r)
        self.pass_seconds = Histogram("m0lite_batch_duration_seconds", "Time per model pass",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.pairs = Counter("m0lite_pairs_scored", "(query, document) pairs scored", registry=r)
        self.tokens = Counter("m0lite_tokens_scored", "Prompt tokens scored (image tokens included)", registry=r)
        self.patches = Counter("m0lite_patches_scored", "Image patches in the pairs scored", registry=r)
        self.dropped = Counter("m0lite_pairs_dropped", "Pairs never scored: their request expired or was "
                               "abandoned by its client", ["reason"], registry=r)
        self.explained = Counter("m0lite_explanations", "Results explained (\"explain\": true)", registry=r)
        self.explain_seconds = Counter("m0lite_explain_seconds", "Model time spent on explanations", registry=r)
        self.images = Counter("m0lite_images_loaded", "Images fetched or decoded", registry=r)
        self.image_pixels = Counter("m0lite_image_pixels_decoded", "Pixels decoded (full size)", registry=r)
        self.image_bytes_held = Gauge("m0lite_image_memory_bytes", "Estimated bytes of images being decoded now",
                                      registry=r)
        if reranker is not None:
            r.register(_CacheCollector(reranker))

    def watch(self, scheduler: Any) -> None:
        """Queue gauges, read from the scheduler when scraped."""
        Gauge("m0lite_queue_depth", "Requests waiting for the model", registry=self.registry).set_function(
            lambda: scheduler.queued)
        Gauge("m0lite_queue_pairs", "Pairs waiting for the model", registry=self.registry).set_function(
            lambda: scheduler.queued_pairs)

    def on_pass(self, pairs: int, tokens: int, patches: int, seconds: float) -> None:
        self.pass_pairs.observe(pairs)
        self.pass_tokens.observe(tokens)
        self.pass_seconds.observe(seconds)
        self.pairs.inc(pairs)
        self.tokens.inc(tokens)
        self.patches.inc(patches)

    def on_explain(self, explanations: int, seconds: float) -> None:
        self.explained.inc(explanations)
        self.explain_seconds.inc(seconds)

    def on_drop(self, reason: str, pairs: int) -> None:
        self.dropped.labels(reason).inc(pairs)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """Hits, misses and bytes of the reranker's document and vision caches (TensorLRU), when scraped."""

    def __init__(self, reranker: Any):
        self.reranker = reranker

    def collect(self):
        hits = CounterMetricFamily("m0lite_cache_hits", "Cache hits", labels=["cache"])
        misses = CounterMetricFamily("m0lite_cache_misses", "Cache misses", labels=["cache"])
        size = GaugeMetricFamily("m0lite_cache_bytes", "Bytes held by the cache", labels=["cache"])
        for name in ("doc_cache", "vision_cache"):
            cache = getattr(self.reranker, name, None)
            if cache is None:
                continue
            label = name.removesuffix("_cache")
            hits.add_metric([label], getattr(cache, "hits", 0))
            misses.add_metric([label], getattr(cache, "misses", 0))
            size.add_metric([label], getattr(cache, "nbytes", 0))
        yield from (hits, misses, size)
