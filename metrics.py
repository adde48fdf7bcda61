"""serve.py's /metrics: Prometheus' text format, written by prometheus_client.

One process: the app's own registry. `--workers N`: serve.py sets PROMETHEUS_MULTIPROC_DIR to a temporary
folder before the workers start; each worker writes its values there (prometheus_client's multiprocess
mode, chosen when it is imported) and /metrics, whichever worker answers it, adds them up over all.
"""

import os
import time
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# 499: nginx's "client closed request", for a request whose client went away before its answer.
CLIENT_GONE = 499


class ServeMetrics:
    """The server's metrics, named cola_*; model names the model served (cola_model_info's labels)."""

    def __init__(self, model: dict[str, str]) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("cola_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.latency = Histogram("cola_request_duration_seconds", "time from a request's arrival to its answer",
                                 ["endpoint"], registry=registry)
        self.sentences = Counter("cola_sentences", "sentences answered by /predict", registry=registry)
        self.predictions = Counter("cola_predictions", "sentences answered, by predicted label", ["label"],
                                   registry=registry)
        self.batch_size = Histogram("cola_model_batch_sentences", "sentences per model call (gathered requests)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.model_seconds = Histogram("cola_model_call_duration_seconds", "duration of one model call",
                                       registry=registry)
        # livesum: the sentences waiting in the processes that are running now.
        self.queued = Gauge("cola_queued_sentences", "sentences waiting for a model call", registry=registry,
                            multiprocess_mode="livesum")
        # An info metric is a gauge of 1 whose labels say it (prometheus_client's Info has no multiprocess mode).
        info = Gauge("cola_model_info", "the model served: checkpoint (run folder and file), its sha256 prefix,"
                     " validation metric and score, base model and task", list(model), registry=registry, multiprocess_mode="max")
        info.labels(**model).set(1)

    def exposition(self) -> bytes:
        """The text /metrics answers: this process's values, or with --workers the sum over all workers."""
        if MULTIPROCESS_DIR not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def record_answer(self, results: list[dict]) -> None:
        self.sentences.inc(len(results))
        for result in results:
            if "label" in result:
                self.predictions.labels(result["label"]).inc()

    @staticmethod
    def process_ended() -> None:
        """A worker that stops leaves the queue-depth sum (its counters stay in the totals)."""
        if MULTIPROCESS_DIR in os.environ:
            multiprocess.mark_process_dead(os.getpid())


class RequestMetrics:
    """ASGI middleware: counts each HTTP request by endpoint and status and times it. Paths that are not the
    app's routes count as endpoint "other", so that random URLs cannot make new time series."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, endpoints: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        started = time.perf_counter()
        status: Optional[int] = None

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception:
            status = status or 500  # the app's error handler, outside this middleware, answers 500
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status or CLIENT_GONE)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
