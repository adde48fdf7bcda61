"""Serve a checkpoint trained by train.py over HTTP, with a page to try sentences on. Offline.

    python serve.py                          # the latest run's (or sweep's) best, http://127.0.0.1:8000
    curl -s http://127.0.0.1:8000/predict -H 'Content-Type: application/json' \\
        -d '{"sentences": ["The boy is sitting on a bench.", "Him sat bench."]}'

POST /predict answers one result per sentence, in order: the objects `python inference.py --json`
prints. GET /health says which checkpoint is served; GET / is the page (serve.html); /docs is
FastAPI's API documentation. Sentences of concurrent requests share model calls (MicroBatcher).
"""

import argparse
import asyncio
import functools
import json
import os
import re
import sys
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NoReturn, Optional

import uvicorn
import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from checkpoints import CheckpointError, find_best_checkpoint, resolve_checkpoint
from inference import BACKENDS, ColaPredictor, InputError

PAGE = Path(__file__).resolve().parent / "serve.html"
# What loading a checkpoint raises for a file or folder that cannot be served: one line, exit 1.
START_UP_ERRORS = (InputError, CheckpointError)
# A gathered batch goes to the model in length-sorted slices of 8: 32 random CoLA sentences padded to the
# longest cost MiniLM-L6 more than the batching saves (measured on 2 cores: 1.35x the one-at-a-time
# sentences/s in one slice of 32, 1.7-1.8x in slices of 8 or 16).
MODEL_BATCH_SIZE = 8
SETTINGS_VARIABLE = "COLA_SERVE_SETTINGS"  # how --workers N hands the settings to its worker processes


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
    batching: bool = True


class MicroBatcher:
    """Gathers the sentences of concurrent requests into one model call, and hands each request its results.

    Why: on a CPU, ONNX Runtime classifies 32 sentences ~1.8x faster together (in length-sorted slices of
    MODEL_BATCH_SIZE) than in 32 calls, and model calls run one at a time anyway (each uses all cores).
    So while a call runs, requests queue up, and the next call takes them together: up to max_batch_size
    sentences, waiting at most max_wait_ms after the first for more to come (0: no waiting, only those
    already queued). A request is never split; one larger than max_batch_size is a call of its own.
    Calls run in a worker thread, so the event loop keeps accepting requests meanwhile.
    """

    def __init__(self, predict: Callable[[list[str]], list[dict]], max_batch_size: int, max_wait_ms: float) -> None:
        self.predict_batch = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.queue: asyncio.Queue[tuple[list[str], asyncio.Future]] = asyncio.Queue()
        self.held_back: Optional[tuple[list[str], asyncio.Future]] = None  # would have overfilled the last batch

    async def predict(self, sentences: list[str]) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((sentences, future))
        return await future

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
        first = self.held_back or await self.queue.get()
        self.held_back = None
        jobs, size = [first], len(first[0])
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while size < self.max_batch_size:
            if not self.queue.empty():  # those that came while the model was busy: no waiting for them
                job = self.queue.get_nowait()
            else:
                try:
                    job = await asyncio.wait_for(self.queue.get(), deadline - asyncio.get_running_loop().time())
                except TimeoutError:
                    break
            if size + len(job[0]) > self.max_batch_size:
                self.held_back = job
                break
            jobs.append(job)
            size += len(job[0])
        return jobs


class BodySizeLimit:
    """413, with a JSON message, for a request body over max_bytes: by its Content-Length before any of it is
    read, or counted as it arrives when it has none (chunked). FastAPI's own max_body_size answers the first
    case in plain text."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # {"sentence": ...} is a mistake to report, not to ignore

    sentences: list[str]


def checkpoint_facts(checkpoint: Path) -> dict:
    """What /health reports, read without loading the checkpoint: its val MCC from its file name
    (train.py's best-epoch=E-val_mcc=M.ckpt) and the model from its run folder's hparams.yaml."""
    mcc = re.search(r"val_mcc=(-?[0-9.]+?)(?:-v\d+)?\.ckpt$", checkpoint.name)
    hparams_file = checkpoint.parent.parent / "hparams.yaml"
    try:
        hparams = yaml.safe_load(hparams_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # none, or damaged: /health says model null
        hparams = None
    return {
        "checkpoint": str(checkpoint),
        "val_mcc": float(mcc.group(1)) if mcc else None,
        "model": hparams.get("model_name_or_path") if isinstance(hparams, dict) else None,
    }


def validation_message(error: dict) -> str:
    """One line from a pydantic error: where in the body (sentences[2]) and what was wrong."""
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:]).lstrip(".")
    return f"{where or 'body'}: {error['msg']}"


def create_app(predictor: ColaPredictor, settings: Settings) -> FastAPI:
    """The API and the page, serving predictor; the batcher runs while the app does (its lifespan)."""
    facts = checkpoint_facts(Path(settings.checkpoint))
    batch_size, wait_ms = (settings.max_batch_size, settings.max_wait_ms) if settings.batching else (1, 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        predict = functools.partial(predictor.predict, batch_size=MODEL_BATCH_SIZE)
        app.state.batcher = MicroBatcher(predict, batch_size, wait_ms)
        task = asyncio.create_task(app.state.batcher.run())
        app.state.ready = True
        yield
        app.state.ready = False
        task.cancel()

    app = FastAPI(
        title="CoLA grammaticality", lifespan=lifespan,
        description="Is an English sentence grammatical? A classifier trained on CoLA by train.py.",
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            return JSONResponse({"detail": f"body is not valid JSON: {error['ctx']['error']}"}, status_code=400)
        if error["loc"] == ("body",) and isinstance(error.get("input"), bytes):  # no JSON content type
            return JSONResponse({"detail": "body is not JSON: send it with Content-Type: application/json"}, 400)
        example = ' (expected {"sentences": ["a sentence", ...]})' if len(error["loc"]) <= 2 else ""
        return JSONResponse({"detail": validation_message(error) + example}, status_code=422)

    @app.exception_handler(Exception)
    async def model_failed(request: Request, exc: Exception) -> JSONResponse:  # JSON, as every other error
        return JSONResponse({"detail": f"the model failed on this batch ({type(exc).__name__})"}, status_code=500)

    @app.post("/predict")
    async def predict(request: PredictRequest) -> list[dict]:
        """One result per sentence, in order: {"sentence", "label", "probabilities": {label: p}},
        or {"sentence", "error"} for an empty one or a non-finite model output."""
        sentences = request.sentences
        if len(sentences) > settings.max_sentences:
            raise HTTPException(413, f"{len(sentences)} sentences: at most {settings.max_sentences} per request")
        for i, sentence in enumerate(sentences):
            if len(sentence) > settings.max_chars:
                raise HTTPException(413, f"sentences[{i}] has {len(sentence)} characters: at most {settings.max_chars}")
            try:
                sentence.encode("utf-8")
            except UnicodeEncodeError:  # JSON can spell a lone surrogate (\ud800), which is not text
                raise HTTPException(422, f"sentences[{i}]: not valid Unicode text (a lone surrogate)") from None
        return await app.state.batcher.predict(sentences)

    @app.get("/health")
    async def health() -> dict:
        """Whether the model is loaded and answering, which checkpoint it is, its val MCC and base model."""
        return {"ready": getattr(app.state, "ready", False), **facts, "backend": settings.backend}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE)

    return app


def app_from_environment() -> FastAPI:
    """The app of one of --workers N's processes: each loads the model itself (uvicorn needs an import string)."""
    settings = Settings(**json.loads(os.environ[SETTINGS_VARIABLE]))
    return create_app(ColaPredictor(settings.checkpoint, backend=settings.backend), settings)


def refuse(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args() -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a .ckpt file, a run folder or a folder of runs (default: logs/cola)")
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
    parser.add_argument("--no_batching", action="store_true", help="one model call per request (for comparison)")
    args = parser.parse_args()
    for name in ("workers", "max_sentences", "max_chars", "max_body_bytes", "max_batch_size"):
        if getattr(args, name) < 1:
            refuse(f"--{name} must be at least 1, not {getattr(args, name)}")
    if not 0 <= args.max_wait_ms < float("inf"):
        refuse(f"--max_wait_ms must be 0 or more, not {args.max_wait_ms}")
    if not 0 <= args.port <= 65535:
        refuse(f"--port must be 0-65535 (0: any free port), not {args.port}")
    settings = Settings(
        checkpoint="", backend=args.backend, max_sentences=args.max_sentences, max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        batching=not args.no_batching,
    )
    return settings, args


def main() -> None:
    settings, args = parse_args()
    try:
        checkpoint = resolve_checkpoint(args.checkpoint or find_best_checkpoint())
        # Loaded here even with --workers: a bad checkpoint fails in one line, and the ONNX export is
        # built once, before the workers would each build it.
        predictor = ColaPredictor(checkpoint, backend=settings.backend)
    except START_UP_ERRORS as e:
        sys.exit(f"error: {e}")
    settings.checkpoint = str(checkpoint)
    if args.workers == 1:
        uvicorn.run(create_app(predictor, settings), host=args.host, port=args.port)
    else:
        del predictor
        os.environ[SETTINGS_VARIABLE] = json.dumps(asdict(settings))
        uvicorn.run("serve:app_from_environment", factory=True, workers=args.workers, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
