"""Prometheus metrics of one server (own registry, so several servers can share a process).

Counters of requests by outcome and of prompt / generated tokens; histograms of time to first
token, inter-token latency and end-to-end latency; gauges of running and waiting sequences
and KV-cache usage, read from the engine's latest stats at scrape time. The two series fed
for every streamed chunk (generated tokens, inter-token latency) are plain numbers on the
event loop, exposed at scrape time (`_LoopSeries`): prometheus_client's locked counters and
histograms cost several microseconds a chunk, on the loop that streams to every client.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from taskloom.engine.client import EngineClient

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class ServerMetrics:
    """The metric families; `RequestTimer` feeds the per-request ones."""

    def __init__(self, client: EngineClient, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self._requests = Counter("taskloom_requests", "Finished requests by outcome",
                                 labels + ["outcome"], registry=r)
        self._prompt_tokens = Counter("taskloom_prompt_tokens",
                                      "Prompt tokens of admitted requests", labels, registry=r)
        self._ttft = Histogram("taskloom_time_to_first_token_seconds", "Time to first token",
                               labels, buckets=_LATENCY_BUCKETS, registry=r)
        self._e2e = Histogram("taskloom_e2e_request_latency_seconds",
                              "Arrival to last token", labels, buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.model_name = model_name
        # This server's series, bound once: `labels()` is a dict lookup under a lock.
        self.prompt_tokens = self._prompt_tokens.labels(model_name)
        self.ttft = self._ttft.labels(model_name)
        self.e2e = self._e2e.labels(model_name)
        self.tokens = _LoopSeries(model_name)    # generated tokens, inter-token latency
        r.register(self.tokens)
        for name, doc, fn in (
                ("taskloom_num_requests_running", "Sequences in the running batch",
                 lambda: client.stats.num_running),
                ("taskloom_num_requests_waiting", "Sequences waiting for admission",
                 lambda: client.num_queued),
                ("taskloom_kv_cache_usage_perc", "Fraction of KV-cache blocks in use",
                 lambda: client.stats.kv_cache_usage),
                ("taskloom_num_preemptions", "Preemptions since start",
                 lambda: client.stats.num_preemptions)):
            Gauge(name, doc, registry=r).set_function(fn)
        r.register(_EngineCountersCollector(client))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def finished(self, outcome: str) -> None:
        self._requests.labels(self.model_name, outcome).inc()


class _LoopSeries(Collector):
    """Generated tokens (a counter) and inter-token latency (a histogram) of one server, fed
    and scraped on its event loop only, so plain numbers need no lock."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.generated = 0
        self.itl_counts = [0] * (len(_LATENCY_BUCKETS) + 1)   # the last: above every bound
        self.itl_sum = 0.0

    def observe_gaps(self, gap: float, count: int) -> None:
        """`count` tokens that each came `gap` seconds after the one before."""
        # a bucket counts values up to its bound, inclusive: the first bound >= gap
        self.itl_counts[bisect.bisect_left(_LATENCY_BUCKETS, gap)] += count
        self.itl_sum += gap * count

    def collect(self):  # -> Iterator[Metric]
        tokens = CounterMetricFamily("taskloom_generation_tokens", "Generated tokens",
                                     labels=["model_name"])
        tokens.add_metric([self.model_name], self.generated)
        yield tokens
        itl = HistogramMetricFamily("taskloom_inter_token_latency_seconds",
                                    "Time between consecutive output tokens",
                                    labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, _LATENCY_BUCKETS), "+Inf"], self.itl_counts):
            cumulative += n
            buckets.append((bound, cumulative))
        itl.add_metric([self.model_name], buckets, self.itl_sum)
        yield itl


class _EngineCountersCollector(Collector):
    """The engine's cache counters: prefix-cache lookups (prompt tokens looked up, and found
    cached; their ratio is the hit rate: `rate(hits) / rate(queries)`) and speculative
    decoding's drafts."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def collect(self):  # -> Iterator[Metric]
        stats = self.client.stats
        yield CounterMetricFamily("taskloom_prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache",
                                  value=stats.prefix_cache_queries)
        yield CounterMetricFamily("taskloom_prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache",
                                  value=stats.prefix_cache_hits)
        # speculative decoding (vLLM's spec_decode counters); acceptance is
        # rate(accepted_tokens) / rate(draft_tokens)
        yield CounterMetricFamily("taskloom_spec_decode_num_drafts",
                                  "Steps of a request that carried draft tokens",
                                  value=stats.spec_decode_num_drafts)
        yield CounterMetricFamily("taskloom_spec_decode_num_draft_tokens",
                                  "Draft tokens run", value=stats.spec_decode_num_draft_tokens)
        yield CounterMetricFamily("taskloom_spec_decode_num_accepted_tokens",
                                  "Draft tokens the model accepted",
                                  value=stats.spec_decode_num_accepted_tokens)
        per_pos = CounterMetricFamily("taskloom_spec_decode_num_accepted_tokens_per_pos",
                                      "Steps that kept a draft at this position (0: the first "
                                      "draft)", labels=["position"])
        for i, n in enumerate(stats.spec_decode_num_accepted_tokens_per_pos):
            per_pos.add_metric([str(i)], n)
        yield per_pos


@dataclass
class RequestTimer:
    """Timing of one engine request (one prompt, all of its n samples)."""

    metrics: ServerMetrics
    arrival: float = field(default_factory=time.monotonic)
    last_token: float | None = None
    num_prompt_tokens: int = 0

    def admitted(self, num_prompt_tokens: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.metrics.prompt_tokens.inc(num_prompt_tokens)

    def tokens(self, count: int) -> None:
        """`count` new output tokens arrived just now."""
        if count <= 0:
            return
        now = time.monotonic()
        m = self.metrics
        m.tokens.generated += count
        if self.last_token is None:
            m.ttft.observe(now - self.arrival)
        else:
            m.tokens.observe_gaps((now - self.last_token) / count, count)
        self.last_token = now

    def done(self, outcome: str) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.arrival)
        self.metrics.finished(outcome)
