"""Serve a checkpoint trained by train.py over HTTP, with a page to try sentences on. Offline.

    python serve.py                          # the latest run's (or sweep's) best, http://127.0.0.1:8000
    python serve.py --checkpoint model/      # its ONNX export alone: no PyTorch (requirements-serve.txt, Dockerfile)
    curl -s http://127.0.0.1:8000/predict -H 'Content-Type: application/json' \\
        -d '{"sentences": ["The boy is sitting on a bench.", "Him sat bench."]}'
    (a model of pairs, e.g. RTE's: -d '{"pairs": [["A man is eating.", "Someone eats."]]}')

POST /predict answers one result per sentence, in order: the objects `python inference.py --json`
prints. GET /health says which checkpoint is served; GET / is the page (serve.html); /docs is
FastAPI's API documentation (its scripts served from here: it works offline); /metrics is for
Prometheus (metrics.py). Sentences of concurrent requests share model calls (MicroBatcher), and
beyond --max_queue waiting sentences a request is refused with 503 rather than queued.
"""

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NoReturn, Optional

SETTINGS_VARIABLE = "COLA_SERVE_SETTINGS"  # how --workers N hands the settings to its worker processes
SUPERVISOR_VARIABLE = "COLA_SERVE_SUPERVISOR"  # ... and the process id they exit without (exit_with_supervisor)
if SUPERVISOR_VARIABLE not in os.environ:  # not a worker of --workers: its supervisor sets both
    # An inherited PROMETHEUS_MULTIPROC_DIR (another program's) put prometheus_client in multiprocess mode, read
    # when it is imported, below: a folder that did not exist was a traceback at start; one that did, mixed metrics.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

import h11  # noqa: E402
import uvicorn  # noqa: E402
import yaml  # noqa: E402
from fastapi import FastAPI, HTTPException, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, Response  # noqa: E402
from fastapi_offline import FastAPIOffline  # noqa: E402
from prometheus_client import Gauge  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402
from starlette.datastructures import Headers  # noqa: E402
from starlette.types import ASGIApp, Receive, Scope, Send  # noqa: E402
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402
from uvicorn.supervisors import Multiprocess  # noqa: E402

from checkpoints import CheckpointError, find_best_checkpoint, process_gone, run_folder_of  # noqa: E402
from export import file_sha256  # noqa: E402
from inference import BACKENDS, Predictor, InputError, resolve_model  # noqa: E402
from metrics import CLIENT_GONE, CONTENT_TYPE, MULTIPROCESS_DIR, RequestMetrics, ServeMetrics  # noqa: E402

PAGE = Path(__file__).resolve().parent / "serve.html"  # read once per start: no file opened per request
# What loading a checkpoint raises for a file or folder that cannot be served: one line, exit 1.
START_UP_ERRORS = (InputError, CheckpointError)
MAX_WORKERS = 1024  # each a process with its own copy of the model: more is a typo (2**64 tried to start them all)
# A gathered batch goes to the model in length-sorted slices of 8: 32 random CoLA sentences padded to the
# longest cost MiniLM-L6 more than the batching saves (measured on 2 cores: 1.35x the one-at-a-time
# sentences/s in one slice of 32, 1.7-1.8x in slices of 8 or 16).
MODEL_BATCH_SIZE = 8
SUPERVISOR_POLL_S = 0.5
METRICS_DIR_PREFIX = "cola-serve-metrics-"  # + the supervisor's process id: --workers N's metrics, in the temp folder
# A refusal (503) is answered after REFUSAL_HOLD_S, with "Retry-After: 0": the wait is over when it comes.
# Clients (and load generators) mostly retry a 503 at once: refused in microseconds, they sent thousands of
# requests a second to refuse, on the cores the model needs. Held, a connection costs at most one refusal a
# second: with hey at 256 connections, goodput went from 0.3x to ~1.0x that of 32 connections and the
# accepted p99 from 9x to 2.4x (benchmarks/README.md, "Overload, measured with hey"). 1 s: the queue it
# found full empties in ~0.1 s, so the retry finds room unless the overload goes on.
REFUSAL_HOLD_S = 1.0
# On SIGTERM, requests in flight finish, but a connection that never completes its request (a stalled
# upload) would hold the shutdown forever: after this many seconds the rest are cancelled and the server
# exits. Well inside `docker stop`'s 10 s and Kubernetes' 30 s before they kill.
GRACEFUL_SHUTDOWN_S = 5
# Connections the kernel may queue before accept(). asyncio accepts up to this many at once before any is
# refused, so the open-files limit must leave room for them above --max_connections (fit_open_files).
BACKLOG = 256
RESERVED_FILES = 64  # the process's own: the model, libraries, logs, the listening socket
MAX_HEADER_BYTES = 16 * 1024  # h11's own bound on headers that arrive in pieces; nginx allows 4 x 8 KB
LOG_EVERY_S = 10.0  # refused and timed-out connections are counted and logged at most this often: no flood


@dataclass
class Settings:
    checkpoint: str
    backend: str = "onnx"
    # One request can hold the others up by the model calls of its sentences: 64 take ~0.1 s for
    # MiniLM-L6 on 2 cores. Longer files: inference.py --file.
    max_sentences: int = 64
    # CoLA's longest sentence has 231 characters; the model reads at most 128 tokens (~500 characters).
    max_chars: int = 1000
    max_body_bytes: int = 256 * 1024
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    # Sentences waiting for a model call beyond which a request gets 503: one full call's worth. MiniLM-L6
    # on 2 cores serves ~400 sentences/s (benchmarks/README.md), so a queued sentence waits ~0.08 s for the
    # call running ahead of it and at most ~0.08 s more in the queue: under 0.2 s, and 32 one-sentence
    # clients are never refused. Unbounded, 256 clients saw a p99 of 0.83 s (6x the 32 clients' p99).
    max_queue: int = 32
    batching: bool = True
    # A client has this long to send a whole request, headers and body, from the moment its connection opens or
    # its previous answer is sent (nginx's client_header_timeout and client_body_timeout, as one deadline that
    # trickled bytes do not extend). 10 s: a 256 KiB body at 26 KB/s.
    request_timeout_s: float = 10.0
    # Connections open at once, per worker; beyond, the longest waiting for its client makes room (503 only when
    # all are busy). Each costs a file descriptor and ~10 KB; with the 1,024 open-files limit common on Linux,
    # 1,100 idle sockets stopped the server answering anyone (benchmarks/README.md, "Hostile clients").
    max_connections: int = 1024


class QueueFull(Exception):
    """A request that would make the batcher's queue longer than max_queue sentences: refused, not queued."""

    def __init__(self, queued: int) -> None:
        super().__init__(f"{queued} sentences are waiting already")
        self.queued = queued


class MicroBatcher:
    """Gathers the sentences of concurrent requests into one model call, and hands each request its results.

    Why: on a CPU, ONNX Runtime classifies 32 sentences ~1.8x faster together (in length-sorted slices of
    MODEL_BATCH_SIZE) than in 32 calls, and model calls run one at a time anyway (each uses all cores).
    So while a call runs, requests queue up, and the next call takes them together: up to max_batch_size
    sentences, waiting at most max_wait_ms after the first for more to come (0: no waiting, only those
    already queued). A request is never split; one larger than max_batch_size is a call of its own.
    Calls run in a worker thread, so the event loop keeps accepting requests meanwhile.
    At most max_queue sentences wait (a request alone in the queue is taken whatever its size): beyond,
    predict() raises QueueFull. A request cancelled while it waits (its client went away) is dropped
    unclassified.
    """

    def __init__(self, predict: Callable[[list[str]], list[dict]], max_batch_size: int, max_wait_ms: float,
                 max_queue: int = Settings.max_queue, queue_depth: Optional[Gauge] = None) -> None:
        self.predict_batch = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.queued = 0  # sentences waiting, the held-back request's included
        self.queue_depth = queue_depth
        self.queue: asyncio.Queue[tuple[list[str], asyncio.Future]] = asyncio.Queue()
        self.held_back: Optional[tuple[list[str], asyncio.Future]] = None  # would have overfilled the last batch

    async def predict(self, sentences: list[str]) -> list[dict]:
        if self.queued and self.queued + len(sentences) > self.max_queue:
            raise QueueFull(self.queued)
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((sentences, future))
        self.count_queued(len(sentences))
        return await future  # cancelling the caller cancels the future: gather() then drops the request

    def full(self) -> bool:
        """Whether any request would be refused now."""
        return self.queued >= self.max_queue

    def count_queued(self, change: int) -> None:
        self.queued += change
        if self.queue_depth:
            self.queue_depth.set(self.queued)

    async def run(self) -> None:
        """Forever: gather a batch, run it in a thread, hand out the results."""
        while True:
            jobs = await self.gather()
            sentences = [s for job_sentences, _ in jobs for s in job_sentences]
            try:
                results = await asyncio.to_thread(self.predict_batch, sentences)
            except Exception as e:  # the model failed: these requests get a 500, the server goes on
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for job_sentences, future in jobs:
                if not future.done():  # done: the client went away and the request was cancelled
                    future.set_result(results[start : start + len(job_sentences)])
                start += len(job_sentences)

    async def gather(self) -> list[tuple[list[str], asyncio.Future]]:
        loop = asyncio.get_running_loop()
        jobs: list[tuple[list[str], asyncio.Future]] = []
        size, deadline = 0, 0.0
        while size < self.max_batch_size:
            if self.held_back:
                job, self.held_back = self.held_back, None
            elif not self.queue.empty():  # those that came while the model was busy: no waiting for them
                job = self.queue.get_nowait()
            elif not jobs:
                job = await self.queue.get()
            else:
                try:
                    job = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except TimeoutError:
                    break
            if job[1].done():  # cancelled while it waited: its client went away, it costs no model time
                self.count_queued(-len(job[0]))
                continue
            if jobs and size + len(job[0]) > self.max_batch_size:
                self.held_back = job
                break
            if not jobs:
                deadline = loop.time() + self.max_wait_s
            jobs.append(job)
            size += len(job[0])
            self.count_queued(-len(job[0]))
        return jobs


async def held_refusal(queued: int, max_queue: int) -> JSONResponse:
    """The 503 of a full queue, after REFUSAL_HOLD_S."""
    await asyncio.sleep(REFUSAL_HOLD_S)
    detail = f"overloaded: {queued} sentences are waiting already, at most {max_queue} may; held {REFUSAL_HOLD_S:g} s, retry now"
    return JSONResponse({"detail": detail}, 503, headers={"Retry-After": "0"})


class RefuseWhenFull:
    """503 for POST /predict while the batcher's queue is full, before anything else runs: no body read, no
    JSON parsed, no validation (through FastAPI a refusal cost more CPU than a classified sentence), held
    REFUSAL_HOLD_S. A request that would only overfill the queue with its many sentences is refused later,
    by the batcher, the same way."""

    def __init__(self, app: ASGIApp, queue_full: Callable[[], bool], max_queue: int) -> None:
        self.app = app
        self.queue_full = queue_full
        self.max_queue = max_queue

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict" and scope["method"] == "POST" and self.queue_full():
            await (await held_refusal(self.max_queue, self.max_queue))(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413, with a JSON message, for a request body over max_bytes: by its Content-Length before any of it is
    read, or counted as it arrives when it has none (chunked). FastAPI's own max_body_size answers the first
    case in plain text. And 431 for headers over MAX_HEADER_BYTES in all: h11 refuses larger ones only when
    they arrive in pieces (a 70 KB header sent at once was served)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            detail = f"request headers over {MAX_HEADER_BYTES} bytes in all"
            return await JSONResponse({"detail": detail}, 431)(scope, receive, send)
        too_large = HTTPException(413, f"request body over {self.max_bytes} bytes: send fewer or shorter sentences")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": too_large.detail}, too_large.status_code)(scope, receive, send)
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large  # raised where FastAPI reads the body: it answers as for any HTTPException
            return message

        await self.app(scope, counting_receive, send)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the two bounds it lacks, so that one client cannot hold the server:

    - a deadline for each request: from the moment a connection opens (or its previous answer has been sent)
      the client has request_timeout_s to send the whole request; then it gets 408 (or, having sent nothing,
      is closed). Trickled bytes do not extend it. Also while the client reads no answer (writing paused).
    - at most max_connections open, so that open files stay below the process's limit (fit_open_files) and
      accept() never fails. Beyond, the connection that has waited longest for its client is closed to make
      room (as nginx closes idle keep-alive connections when it runs out): one client holding idle or slow
      connections cannot shut others out. Only when every connection has a request the app works on is the
      new one answered 503 with Retry-After and closed.

    uvicorn's own timeout_keep_alive starts only after an answer and any byte cancels it; its limit_concurrency
    answers 503 only to a complete request. Refusals and closings are logged as counts, every LOG_EVERY_S."""

    max_connections = Settings.max_connections
    request_timeout_s = Settings.request_timeout_s
    counts = {"refused": 0, "timed_out": 0, "made_room": 0}
    last_logged = 0.0
    log_pending = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.deadline: Optional[asyncio.TimerHandle] = None
        if len(self.connections) > self.max_connections:
            waiting = [c for c in self.connections if getattr(c, "deadline", None) is not None]
            if waiting:  # the longest waiting (the earliest deadline) makes room
                min(waiting, key=lambda c: c.deadline.when()).timed_out(made_room=True)
            else:
                self.count("refused")
                self.answer_and_close(b"503 Service Unavailable", f"{self.max_connections} requests are being answered:"
                                      " retry in a second", b"retry-after: 1\r\n")
                return
        self.update_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.update_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.update_deadline()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.update_deadline()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.update_deadline()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if getattr(self, "deadline", None):
            self.deadline.cancel()
        super().connection_lost(exc)

    def update_deadline(self) -> None:
        """Armed while the server waits for the client (its request, or its reading of the answer); off while
        the app works on a whole request. Armed once per wait: bytes that arrive do not move it."""
        cycle = self.cycle
        waiting = cycle is None or cycle.response_complete or cycle.more_body or self.flow.write_paused
        if waiting and self.deadline is None and not self.transport.is_closing():
            self.deadline = self.loop.call_later(self.request_timeout_s, self.timed_out)
        elif not waiting and self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def timed_out(self, made_room: bool = False) -> None:
        """At the deadline, or to make room for a new connection: 408 if a request had begun, then closed."""
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.transport.is_closing():
            return
        self.count("made_room" if made_room else "timed_out")
        started = self.conn.their_state is h11.SEND_BODY or bool(self.conn.trailing_data[0])
        if started and (self.cycle is None or self.cycle.response_complete or not self.cycle.response_started):
            why = "the server needed its connection" if made_room else f"it took over {self.request_timeout_s:g} s to arrive"
            return self.answer_and_close(b"408 Request Timeout", f"request not read: {why}; send it at once")
        self.transport.close()

    def shutdown(self) -> None:
        """At SIGTERM: a client still sending its request gets a JSON 503 now (send it again: another server will
        answer), not uvicorn's plain-text 500 once the graceful shutdown's GRACEFUL_SHUTDOWN_S run out, with a
        CancelledError traceback in the log. Its app task reads a disconnect and ends."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and not cycle.response_complete and cycle.more_body:
            cycle.disconnected = True  # nothing more is written on this connection
            cycle.message_event.set()
            return self.answer_and_close(b"503 Service Unavailable", "the server is shutting down: send the request again",
                                         b"retry-after: 1\r\n")
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a Content-Length of -5, abc or +5; headers over its bound, sent in pieces): the
        JSON {"detail"} of every other bad request, not uvicorn's plain text."""
        self.answer_and_close(b"400 Bad Request", f"{msg.rstrip('.')}: not an HTTP/1.1 request this server can read")

    def answer_and_close(self, status: bytes, detail: str, headers: bytes = b"") -> None:
        """A JSON {"detail"} answer written as it is (no request of this connection is in h11's hands), then closed."""
        body = json.dumps({"detail": detail}).encode()
        self.transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n%sconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (status, headers, len(body), body))
        self.transport.close()

    @classmethod
    def count(cls, what: str) -> None:
        cls.counts[what] += 1
        if not cls.log_pending:
            cls.log_pending = True
            wait = max(0.0, cls.last_logged + LOG_EVERY_S - time.monotonic())
            asyncio.get_running_loop().call_later(wait, cls.log_counts)

    @classmethod
    def log_counts(cls) -> None:
        counts, cls.counts = cls.counts, {"refused": 0, "timed_out": 0, "made_room": 0}
        cls.last_logged, cls.log_pending = time.monotonic(), False
        logging.getLogger("uvicorn.error").warning(
            f"closed {counts['timed_out']} connection(s) that sent no whole request within {cls.request_timeout_s:g} s"
            f" (--request_timeout_s) and {counts['made_room']} waiting ones to make room for new ones; refused"
            f" {counts['refused']} with all {cls.max_connections} busy (--max_connections)")

    @classmethod
    def configure(cls, settings: Settings) -> None:
        """In each serving process, before it starts (the workers import this module anew)."""
        cls.max_connections, cls.request_timeout_s = settings.max_connections, settings.request_timeout_s
        logging.getLogger("asyncio").addFilter(RateLimitedAcceptErrors())


def fit_open_files(max_connections: int) -> tuple[int, int]:
    """(connections, backlog) that this process's open files can hold: first its open-files limit is raised (the
    soft one, up to the hard one, as nginx's worker_rlimit_nofile does); if that is not enough, fewer of both,
    said in a note. asyncio accepts up to `backlog` connections before refusing any, so both need room."""
    import resource  # POSIX only

    needed = max_connections + BACKLOG + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections, BACKLOG
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft >= needed:
        return max_connections, BACKLOG
    room = soft - RESERVED_FILES
    backlog = min(BACKLOG, room // 4)
    if backlog < 1:
        refuse(f"the open-files limit ({soft}, ulimit -n) leaves no room for connections: raise it to {needed} or more")
    print(f"note: the open-files limit ({soft}, ulimit -n) fits {room - backlog} connections at once, not --max_connections"
          f" {max_connections}: raise the hard limit to {needed} for all of them", file=sys.stderr)
    return room - backlog, backlog


class RateLimitedAcceptErrors(logging.Filter):
    """asyncio logs a traceback for every failed accept() (out of open files: ~250,000 of them in 20 s, 130 MB,
    before the bound above): one line every LOG_EVERY_S instead, should anything else use the files up."""

    last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("socket.accept() out of system resource"):
            return True
        if time.monotonic() - self.last < LOG_EVERY_S:
            return False
        self.last, record.exc_info, record.exc_text = time.monotonic(), None, None
        return True


class PredictRequest(BaseModel):
    """The body for a model of single texts; PairsRequest's for one of pairs (/health's "texts" says which)."""

    model_config = ConfigDict(extra="forbid")  # {"sentence": ...} is a mistake to report, not to ignore

    sentences: list[str]


class PairsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: list[tuple[str, str]]


EXAMPLE = {1: '{"sentences": ["a sentence", ...]}', 2: '{"pairs": [["first text", "second text"], ...]}'}


class ErrorDetail(BaseModel):
    detail: str  # one line: what was wrong, and how to send it right


# Every answer /predict gives besides 200, in its OpenAPI schema (the 422 is ours: one line, not FastAPI's list).
PREDICT_ERRORS = {
    status: {"model": ErrorDetail, "description": description} for status, description in (
        (400, "the body is not JSON"), (408, "the request took over --request_timeout_s to arrive"),
        (413, "too many sentences, too long a sentence, or too large a body"),
        (422, "not {\"sentences\": [strings]} (nor, for a model of pairs, {\"pairs\": [[string, string]]})"),
        (431, "request headers over 16 KiB"), (503, "overloaded: retry (Retry-After)"),
    )
}


def checkpoint_facts(checkpoint: Path, export_base_model: Optional[str] = None) -> dict:
    """What /health, the page and /metrics say of the model, read without loading it, and naming no path of
    this machine: the checkpoint (or export) by run folder and file name (cola/version_0/best-....ckpt), the
    start of the served file's sha256, its validation score from its file name (train.py's best-epoch=E-val_mcc=M.ckpt:
    metric val_mcc, score M)
    and the base model from its run folder's hparams.yaml, else the one an export names (export_base_model);
    a local folder by its last two names, whichever machine it was on."""
    run = run_folder_of(checkpoint)
    score = re.search(r"(val_(?:mcc|accuracy|f1))=(-?[0-9.]+?)(?:-v\d+)?\.(?:ckpt|onnx|int8\.onnx)$", checkpoint.name)
    try:
        hparams = yaml.safe_load((checkpoint.parent.parent / "hparams.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # none, or damaged: /health says model null
        hparams = None
    model = hparams.get("model_name_or_path") if isinstance(hparams, dict) else None
    model = model if isinstance(model, str) else export_base_model  # an export served without its run folder
    if isinstance(model, str) and Path(model).expanduser().is_absolute():
        model = "/".join(Path(model).parts[-2:])
    return {
        "checkpoint": f"{run.parent.name}/{run.name}/{checkpoint.name}" if run else checkpoint.name,
        "sha256": file_sha256(checkpoint)[:12],  # ~0.1 s for MiniLM's 90 MB, once per start
        "metric": score.group(1) if score else None,
        "score": float(score.group(2)) if score else None,
        "model": model if isinstance(model, str) else None,
    }


async def client_gone(request: Request) -> None:
    """Returns once the client has closed its connection (its request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def validation_message(error: dict) -> str:
    """One line from a pydantic error: where in the body (sentences[2]) and what was wrong."""
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:]).lstrip(".")
    return f"{where or 'body'}: {error['msg']}"


def create_app(predictor: Predictor, settings: Settings) -> FastAPI:
    """The API and the page, serving predictor; the batcher runs while the app does (its lifespan)."""
    facts = {**checkpoint_facts(Path(settings.checkpoint), getattr(predictor, "base_model", None)),
             "task": getattr(predictor, "task", "cola")}
    text_names = list(getattr(predictor, "text_names", ["sentence"]))
    labels = list(getattr(predictor, "labels", []))
    texts = len(text_names)
    batch_size, wait_ms = (settings.max_batch_size, settings.max_wait_ms) if settings.batching else (1, 0)
    metrics = ServeMetrics({name: "" if value is None else str(value) for name, value in facts.items()})

    def predict_batch(sentences: list[str]) -> list[dict]:
        with metrics.model_seconds.time():
            results = predictor.predict(sentences, batch_size=MODEL_BATCH_SIZE)
        metrics.batch_size.observe(len(sentences))
        return results

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = MicroBatcher(predict_batch, batch_size, wait_ms, settings.max_queue, metrics.queued)
        task = asyncio.create_task(app.state.batcher.run())
        app.state.ready = True
        yield
        app.state.ready = False
        task.cancel()
        metrics.process_ended()

    # FastAPIOffline: FastAPI, with /docs's Swagger UI (and /redoc) served from an installed package rather
    # than a CDN, so the API documentation works offline.
    app = FastAPIOffline(
        title="CoLA grammaticality" if facts["task"] == "cola" else f"{facts['task']}: text classification", lifespan=lifespan,
        description="Is an English sentence grammatical? A classifier trained on CoLA by train.py." if facts["task"] == "cola"
        else f"A classifier of {'pairs of texts' if texts == 2 else 'texts'} trained on {facts['task']} by train.py:"
             f" labels {', '.join(labels)}.",
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":  # ctx: json's message ("Invalid control character at"), loc: its offset
            where = f"{error['ctx']['error'].removesuffix(' at')} at character {error['loc'][-1]}"
            return JSONResponse({"detail": f"body is not valid JSON: {where}"}, status_code=400)
        if error["loc"] == ("body",) and isinstance(error.get("input"), bytes):  # no JSON content type
            return JSONResponse({"detail": "body is not JSON: send it with Content-Type: application/json"}, 400)
        example = f' (expected {EXAMPLE[texts]})' if len(error["loc"]) <= 2 else ""
        return JSONResponse({"detail": validation_message(error) + example}, status_code=422)

    @app.exception_handler(Exception)
    async def model_failed(request: Request, exc: Exception) -> JSONResponse:  # JSON, as every other error
        return JSONResponse({"detail": f"the model failed on this batch ({type(exc).__name__})"}, status_code=500)

    @app.post("/predict", responses=PREDICT_ERRORS)
    async def predict(body: PairsRequest if texts == 2 else PredictRequest, request: Request) -> list[dict]:
        """One result per sentence, in order: {"sentence", "label", "probabilities": {label: p}},
        or {"sentence", "error"} for an empty one or a non-finite model output ({"pair": [first, second], ...}
        for a model of pairs). 503 with Retry-After when the server has more sentences waiting than it can
        answer in a few hundred milliseconds."""
        field = "pairs" if texts == 2 else "sentences"
        sentences = getattr(body, field)
        if len(sentences) > settings.max_sentences:
            raise HTTPException(413, f"{len(sentences)} {field}: at most {settings.max_sentences} per request")
        for i, item in enumerate(sentences):
            for j, sentence in enumerate(item if texts == 2 else [item]):
                where = f"{field}[{i}]" + (f"[{j}]" if texts == 2 else "")
                if len(sentence) > settings.max_chars:
                    raise HTTPException(413, f"{where} has {len(sentence)} characters: at most {settings.max_chars}")
                try:
                    sentence.encode("utf-8")
                except UnicodeEncodeError:  # JSON can spell a lone surrogate (\ud800), which is not text
                    raise HTTPException(422, f"{where}: not valid Unicode text (a lone surrogate)") from None
        answer = asyncio.ensure_future(app.state.batcher.predict(sentences))
        gone = asyncio.ensure_future(client_gone(request))
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not answer.done():  # the client went away: its sentences leave the queue unclassified
            answer.cancel()
            return Response(status_code=CLIENT_GONE)
        try:
            results = answer.result()
        except QueueFull as e:
            return await held_refusal(e.queued, settings.max_queue)
        metrics.record_answer(results)
        return results

    @app.get("/health")
    async def health() -> dict:
        """Whether the model is loaded and answering, which checkpoint it is (run folder and file name, the
        start of its sha256), its validation score (metric and score) and base model; its task, labels and
        texts (["sentence"], or two names for a model of pairs)."""
        return {"ready": getattr(app.state, "ready", False), **facts, "backend": settings.backend,
                "labels": labels, "texts": text_names}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    page_html = PAGE.read_bytes()

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    app.add_middleware(RefuseWhenFull, max_queue=settings.max_queue,
                       queue_full=lambda: getattr(app.state, "batcher", None) is not None and app.state.batcher.full())
    # Outermost, so that it counts every answer, 413s of BodySizeLimit included.
    app.add_middleware(RequestMetrics, metrics=metrics, endpoints={route.path for route in app.routes})
    return app


def exit_with_supervisor(supervisor: int) -> None:
    """Stop this worker (as SIGTERM does: gracefully) once the process that started it is gone. A supervisor
    killed with SIGKILL (or by the OOM killer) tells its workers nothing: they would serve on, orphans holding
    the port, and the next `python serve.py` would fail with "address already in use". Polled, not Linux's
    PR_SET_PDEATHSIG, which fires when the starting *thread* ends and exists on no other system."""

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(SUPERVISOR_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-supervisor", daemon=True).start()


def app_from_environment() -> FastAPI:
    """The app of one of --workers N's processes: each loads the model itself (uvicorn needs an import string)."""
    exit_with_supervisor(int(os.environ[SUPERVISOR_VARIABLE]))
    settings = Settings(**json.loads(os.environ[SETTINGS_VARIABLE]))
    GuardedH11Protocol.configure(settings)
    return create_app(Predictor(settings.checkpoint, backend=settings.backend), settings)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use is one line, at once (uvicorn bound it
    after loading, then logged the error among its start and stop lines, exit 3)."""
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say so (Python 3.11's
    # base_events._set_nodelay); with 0, Nagle's algorithm stayed on and answers waited for delayed ACKs: 0.3x
    # the requests/s at 32 connections (benchmarks/README.md, "Hostile clients").
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sys.exit(f"error: cannot listen on {host}:{port}: {e.strerror or e} (another server there? give another --port)")
    sock.set_inheritable(True)  # the workers of --workers accept on it
    return sock


def remove_stale_metrics_dirs() -> None:
    """The metrics folders of --workers supervisors that were killed (kill -9 runs no clean-up): removed, so that
    they do not pile up in the temp folder."""
    for folder in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = folder.name.removeprefix(METRICS_DIR_PREFIX).split("-")[0]
        if pid.isdigit() and process_gone(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def refuse(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a .ckpt file, a run folder, a folder of runs (default: logs/cola),"
                        " or an ONNX export: a .onnx file or a folder holding it (no PyTorch needed)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept connections from other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--backend", choices=BACKENDS, default="onnx")
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    defaults = Settings(checkpoint="")
    parser.add_argument("--max_sentences", type=int, default=defaults.max_sentences, help="per request")
    parser.add_argument("--max_chars", type=int, default=defaults.max_chars, help="per sentence")
    parser.add_argument("--max_body_bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--max_batch_size", type=int, default=defaults.max_batch_size,
                        help="most sentences the batcher gathers into one model call")
    parser.add_argument("--max_wait_ms", type=float, default=defaults.max_wait_ms,
                        help="how long the batcher waits for more sentences after the first")
    parser.add_argument("--max_queue", type=int, default=defaults.max_queue,
                        help="sentences waiting for the model (per worker) beyond which a request gets 503")
    parser.add_argument("--no_batching", action="store_true", help="one model call per request (for comparison)")
    parser.add_argument("--request_timeout_s", type=float, default=defaults.request_timeout_s,
                        help="a client has this long to send a whole request (its headers and body): then 408")
    parser.add_argument("--max_connections", type=int, default=defaults.max_connections,
                        help="connections open at once (per worker); beyond, a new one gets 503 and is closed")
    # argparse prints its usage before the error: one line instead, as every other problem.
    parser.error = lambda message: refuse(f"{message} (python serve.py --help lists the options)")
    return parser


def parse_args() -> tuple[Settings, argparse.Namespace]:
    args = build_parser().parse_args()
    for name in ("workers", "max_sentences", "max_chars", "max_body_bytes", "max_batch_size", "max_queue", "max_connections"):
        if getattr(args, name) < 1:
            refuse(f"--{name} must be at least 1, not {getattr(args, name)}")
    if not 0 <= args.max_wait_ms < float("inf"):
        refuse(f"--max_wait_ms must be 0 or more, not {args.max_wait_ms}")
    if not 0 < args.request_timeout_s < float("inf"):
        refuse(f"--request_timeout_s must be above 0, not {args.request_timeout_s}")
    if args.workers > MAX_WORKERS:
        refuse(f"--workers must be at most {MAX_WORKERS}, not {args.workers}")
    if not args.host.strip():  # an unset variable ("--host $HOST"): the socket API would bind every interface
        refuse("--host is empty: give an address (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    if not 0 <= args.port <= 65535:
        refuse(f"--port must be 0-65535 (0: any free port), not {args.port}")
    settings = Settings(
        checkpoint="", backend=args.backend, max_sentences=args.max_sentences, max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, batching=not args.no_batching, request_timeout_s=args.request_timeout_s,
        max_connections=args.max_connections,
    )
    return settings, args


class Supervisor(Multiprocess):
    """uvicorn's supervisor of --workers N, remembering the signal that stopped it: its run() returns
    normally, and a server stopped by SIGTERM should exit with SIGTERM's status, as with one worker."""

    stopped_by: Optional[int] = None

    def handle_int(self) -> None:
        self.stopped_by = signal.SIGINT
        super().handle_int()

    def handle_term(self) -> None:
        self.stopped_by = signal.SIGTERM
        super().handle_term()


def main() -> None:
    settings, args = parse_args()
    try:
        checkpoint = resolve_model(args.checkpoint or find_best_checkpoint(), settings.backend)
        sock = listen(args.host, args.port)  # before the slow part
        # Loaded here even with --workers: a bad checkpoint fails in one line, and the ONNX export is
        # built once, before the workers would each build it.
        predictor = Predictor(checkpoint, backend=settings.backend)
    except START_UP_ERRORS as e:
        sys.exit(f"error: {e}")
    settings.checkpoint = str(checkpoint)
    settings.max_connections, backlog = fit_open_files(settings.max_connections)  # the workers inherit the limit
    GuardedH11Protocol.configure(settings)
    server = dict(host=args.host, port=args.port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, http=GuardedH11Protocol,
                  backlog=backlog)
    if args.workers == 1:
        # After its graceful shutdown uvicorn raises the signal again: exit status 143 for a SIGTERM.
        server = uvicorn.Server(uvicorn.Config(create_app(predictor, settings), **server))
        server.run(sockets=[sock])
        if not server.started:
            sys.exit("error: the server failed to start (its error is above)")
        return
    del predictor
    os.environ[SETTINGS_VARIABLE] = json.dumps(asdict(settings))
    os.environ[SUPERVISOR_VARIABLE] = str(os.getpid())  # not the workers' getppid(): it may be gone before they look
    remove_stale_metrics_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-") as metrics_dir:
        os.environ[MULTIPROCESS_DIR] = metrics_dir  # the workers import prometheus_client in multiprocess mode
        # The protocol by import string, as the app: the class app_from_environment configures in each worker.
        server["http"] = "serve:GuardedH11Protocol"
        config = uvicorn.Config("serve:app_from_environment", factory=True, workers=args.workers, **server)
        supervisor = Supervisor(config, sockets=[sock])
        supervisor.run()
    if supervisor.stopped_by is None:
        sys.exit("error: a worker failed to start (its error is above)")
    signal.signal(supervisor.stopped_by, signal.SIG_DFL)  # exit as one worker does: by the signal
    signal.raise_signal(supervisor.stopped_by)


if __name__ == "__main__":
    main()
