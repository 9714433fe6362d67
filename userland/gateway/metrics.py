"""/metrics in Prometheus's text format, through prometheus_client.

Two kinds of metric. The gateway's own, kept as it answers: HTTP requests by endpoint and
status, time to first token and inter-token latency as its clients see them (chunk to chunk, per
token). And llmos's, read at each scrape with syscalls: tokens in and out by process name (ps),
syscalls by name (kstat), the run queue and the KV blocks (runqueue), service restarts
(services). Names follow Prometheus's: the ``llmos_`` prefix, ``_total`` for counters,
``_seconds`` for durations.

Tokens by process name add the live processes' counts (ps) to what the kernel kept of those that
ended under that name (kstat's ended_tokens), so a counter never goes down when a program exits.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from syscalls.errors import LLMOSError

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
QUEUE_STATES = ("running", "ready", "suspended", "stopped", "throttled")


class Metrics:
    """The gateway's own metrics, and the scrape that adds llmos's."""

    def __init__(self, endpoints: list[str]):
        self.endpoints = set(endpoints)
        self.registry = CollectorRegistry()
        self.requests = Counter("llmos_http_requests", "HTTP requests answered, by endpoint and "
                                "status", ("endpoint", "status"), registry=self.registry)
        self.ttft = Histogram("llmos_time_to_first_token_seconds", "From a generation's start to "
                              "its first chunk, at the gateway", buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.itl = Histogram("llmos_inter_token_latency_seconds", "Between a generation's chunks, "
                             "per token, at the gateway", buckets=ITL_BUCKETS, registry=self.registry)

    def answered(self, path: str, status: int) -> None:
        endpoint = path if path in self.endpoints else \
            "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        self.requests.labels(endpoint, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens_came(self, seconds: float, tokens: int) -> None:
        for _ in range(tokens):
            self.itl.observe(seconds / tokens)

    async def render(self, conn) -> bytes:
        """The text of one scrape: the gateway's metrics, then llmos's as they are now."""
        ps, kstat, services = await asyncio.gather(conn.ps(), conn.kstat(), conn.services())
        try:
            queue = await conn.runqueue()
        except LLMOSError:          # no inference service (ESRVDOWN): no run queue, no KV cache
            queue = None
        now = CollectorRegistry(auto_describe=False)
        now.register(_Snapshot(ps, kstat, services, queue))
        return generate_latest(self.registry) + generate_latest(now)


class _Snapshot:
    """llmos's metrics from one scrape's syscalls, as prometheus_client collects them."""

    def __init__(self, ps: list, kstat: dict, services: list, queue: dict | None):
        self.ps, self.kstat, self.services, self.queue = ps, kstat, services, queue

    def collect(self):
        for field, what in (("tokens_in", "Prompt tokens read"), ("tokens_out", "Tokens generated")):
            family = CounterMetricFamily(f"llmos_{field}", f"{what} since boot, by process name",
                                         labels=("process",))
            at = 0 if field == "tokens_in" else 1
            by_name: dict[str, int] = {}
            for name, t in self.kstat.get("ended_tokens", {}).items():
                by_name[name or "(unnamed)"] = by_name.get(name or "(unnamed)", 0) + t[at]
            for p in self.ps:
                if p["state"] != "ZOMBIE":        # an ended one is in ended_tokens already
                    name = p["name"] or "(unnamed)"
                    by_name[name] = by_name.get(name, 0) + p[field]
            for name, n in sorted(by_name.items()):
                family.add_metric([name], n)
            yield family
        family = CounterMetricFamily("llmos_syscalls", "Syscalls made since boot, by name",
                                     labels=("syscall",))
        for name, n in sorted(self.kstat.get("syscalls", {}).items()):
            family.add_metric([name], n)
        yield family
        yield GaugeMetricFamily("llmos_processes", "Processes in the process table", len(self.ps))
        restarts = CounterMetricFamily("llmos_service_restarts", "Restarts of each service since "
                                       "boot", labels=("service",))
        up = GaugeMetricFamily("llmos_service_up", "1 while a service is READY", labels=("service",))
        for svc in self.services:
            restarts.add_metric([svc["name"]], svc["restarts"])
            up.add_metric([svc["name"]], 1 if svc["state"] == "READY" else 0)
        yield restarts
        yield up
        if self.queue is None:
            return
        depth = GaugeMetricFamily("llmos_runqueue_requests", "Requests in the model's run queue, "
                                  "by state", labels=("state",))
        for state in QUEUE_STATES:
            depth.add_metric([state], self.queue.get(state, 0))
        yield depth
        for field, what in (("blocks_used", "in use"), ("blocks_total", "in the pool"),
                            ("blocks_cached", "held by idle contexts")):
            yield GaugeMetricFamily(f"llmos_kv_{field}", f"KV cache blocks {what}", self.queue[field])
