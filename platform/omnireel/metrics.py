"""Every OmniReel metric, defined once: name, kind, unit (in the name), description, labels.

Metrics are created lazily on first use, with one of two backends:
- inside Ray (a Serve replica, a Ray Data worker, a driver after ray.init) they are Ray's metrics,
  exported on Ray's Prometheus endpoint with Ray's `ray_` prefix;
- outside Ray they are prometheus_client metrics in `REGISTRY`, which `serve_http` exposes and
  `push_totals` pushes to a Pushgateway (for batch clusters that may be gone before a scrape).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_JOBS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
BATCH_TOKENS_BUCKETS = tuple(2 ** i for i in range(6, 19))    # 64 .. 262144


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str                      # "counter" | "gauge" | "histogram"
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = LATENCY_BUCKETS


SPECS: dict[str, MetricSpec] = {s.name: s for s in (
    MetricSpec("omnireel_stage_seconds", "histogram", "Wall time of one pipeline stage for one request",
               ("stage", "driver")),
    MetricSpec("omnireel_queue_wait_seconds", "histogram", "Time a job waited before its work started",
               ("driver",)),
    MetricSpec("omnireel_jobs", "counter", "Online jobs that reached a status", ("status",)),
    MetricSpec("omnireel_jobs_active", "gauge", "Online jobs currently queued or in progress", ("status",)),
    MetricSpec("omnireel_denoise_steps", "counter", "Denoising steps completed (rate = steps/s)", ("driver",)),
    MetricSpec("omnireel_denoise_batch_jobs", "histogram", "Jobs in one denoising step of a backbone host's "
               "scheduler (continuous batching)", ("driver",), BATCH_JOBS_BUCKETS),
    MetricSpec("omnireel_denoise_batch_tokens", "histogram", "Tokens (layout length x CFG rows) in one "
               "denoising step of a backbone host's scheduler", ("driver",), BATCH_TOKENS_BUCKETS),
    MetricSpec("omnireel_http_requests", "counter", "HTTP requests answered", ("route", "code")),
    MetricSpec("omnireel_batch_rows", "counter", "Batch manifest rows finished", ("outcome",)),
    MetricSpec("omnireel_batch_videos_per_hour", "gauge", "Batch throughput over the run so far", ()),
    MetricSpec("omnireel_batch_denoise_busy_ratio", "gauge",
               "Fraction of a batch run's warm window the denoise actors spent running the backbone", ()),
)}

_METHODS = {"counter": "inc", "gauge": "set", "histogram": "observe"}
_lock = threading.Lock()
_created: dict[str, object] = {}
REGISTRY = None   # prometheus_client.CollectorRegistry, created on first non-Ray use


def _in_ray() -> bool:
    try:
        import ray
        return ray.is_initialized()
    except ImportError:
        return False


class _RayMetric:
    def __init__(self, spec: MetricSpec):
        from ray.util import metrics as ray_metrics
        kinds = {"counter": ray_metrics.Counter, "gauge": ray_metrics.Gauge, "histogram": ray_metrics.Histogram}
        kwargs = {"boundaries": list(spec.buckets)} if spec.kind == "histogram" else {}
        self.metric = kinds[spec.kind](spec.name, description=spec.description, tag_keys=spec.labels, **kwargs)

    def record(self, kind: str, value: float, labels: dict) -> None:
        # by name: a Histogram has no `inc`, a Counter no `set` (a dict of bound methods would fail)
        getattr(self.metric, _METHODS[kind])(value, tags=labels or None)


class _PrometheusMetric:
    def __init__(self, spec: MetricSpec):
        global REGISTRY
        import prometheus_client as pc
        if REGISTRY is None:
            REGISTRY = pc.CollectorRegistry()
        kinds = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}
        kwargs = {"buckets": spec.buckets} if spec.kind == "histogram" else {}
        self.metric = kinds[spec.kind](spec.name, spec.description, spec.labels, registry=REGISTRY, **kwargs)

    def record(self, kind: str, value: float, labels: dict) -> None:
        target = self.metric.labels(**labels) if labels else self.metric
        getattr(target, _METHODS[kind])(value)


def record(name: str, value: float = 1.0, **labels: str) -> None:
    """Add to a counter, set a gauge or observe a histogram, by the metric's defined kind."""
    spec = SPECS[name]
    if set(labels) != set(spec.labels):
        raise ValueError(f"metric {name} takes labels {spec.labels}, got {tuple(labels)}")
    with _lock:
        metric = _created.get(name)
        if metric is None:
            metric = _created[name] = (_RayMetric if _in_ray() else _PrometheusMetric)(spec)
    metric.record(spec.kind, value, {k: str(v) for k, v in labels.items()})


def serve_http(port: int, addr: str = "127.0.0.1") -> None:
    """Expose the prometheus_client registry (outside Ray) on http://addr:port/metrics."""
    import prometheus_client as pc
    global REGISTRY
    if REGISTRY is None:
        REGISTRY = pc.CollectorRegistry()
    pc.start_http_server(port, addr=addr, registry=REGISTRY)


def push_totals(gateway: str, job: str, totals: dict[str, float], grouping: dict[str, str] | None = None) -> None:
    """Push final gauges `omnireel_batch_<key>` (e.g. rows_done) to a Prometheus Pushgateway."""
    import prometheus_client as pc
    registry = pc.CollectorRegistry()
    for key, value in totals.items():
        pc.Gauge(f"omnireel_batch_{key}", f"Batch run total: {key}", registry=registry).set(value)
    pc.push_to_gateway(gateway, job=job, registry=registry, grouping_key=grouping or {})
