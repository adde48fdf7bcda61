"""serve.py: the API through FastAPI's TestClient, the batcher on its own, and a real server process."""

import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, Optional

import httpx
import psutil
import pytest
import uvicorn
from fastapi.testclient import TestClient

from benchmarks import serve_load
from conftest import REPO, make_sentence
from inference import Predictor
from serve import GRACEFUL_SHUTDOWN_S, REFUSAL_HOLD_S, MicroBatcher, Settings, create_app

SENTENCES = ["The dog sat on the mat.", "Mat the on sat dog the.", "A big cat ran quickly under the bench."]


@pytest.fixture(scope="module")
def best_checkpoint(trained) -> Path:
    workdir, _ = trained
    return workdir / json.loads((workdir / "logs/cola/version_0/metrics.json").read_text())["best_model_path"]


@pytest.fixture(scope="module")
def predictor(best_checkpoint) -> Predictor:
    return Predictor(best_checkpoint)


def client_for(predictor: Predictor, checkpoint: Path, **settings) -> TestClient:
    return TestClient(create_app(predictor, Settings(checkpoint=str(checkpoint), **settings)))


def test_results_are_colapredictors_exactly(predictor, best_checkpoint):
    sentences = SENTENCES + [""]
    with client_for(predictor, best_checkpoint) as client:
        response = client.post("/predict", json={"sentences": sentences})
    assert response.status_code == 200
    # Exactly: floats survive JSON, and up to MODEL_BATCH_SIZE sentences are one model call either way.
    assert response.json() == predictor.predict(sentences)
    assert response.json()[-1] == {"sentence": "", "error": "empty sentence"}


def test_health_names_the_checkpoint_its_mcc_and_model(predictor, best_checkpoint, trained, tiny_model_dir):
    workdir, _ = trained
    with client_for(predictor, best_checkpoint) as client:
        health = client.get("/health").json()
        assert client.get("/").headers["content-type"].startswith("text/html")
        assert "<textarea" in client.get("/").text
        assert client.get("/docs").status_code == 200  # FastAPI's API docs stay on
    metrics = json.loads((workdir / "logs/cola/version_0/metrics.json").read_text())
    # By run folder and file name, and content: no path of the server's machine.
    assert health["ready"] is True and health["checkpoint"] == f"cola/version_0/{best_checkpoint.name}"
    assert health["sha256"] == hashlib.sha256(best_checkpoint.read_bytes()).hexdigest()[:12]
    assert health["metric"] == "val_mcc" and health["score"] == pytest.approx(metrics["best_val_mcc"], abs=5e-5)  # the file name's 4 decimals
    assert (health["task"], health["labels"], health["texts"]) == ("cola", ["unacceptable", "acceptable"], ["sentence"])
    assert health["model"] == f"{tiny_model_dir.parent.name}/{tiny_model_dir.name}"  # a local folder: its last names


def test_concurrent_requests_each_get_their_own_answers(predictor, best_checkpoint):
    """Many requests at once, of different sentences and counts: gathered into shared model calls, each
    request still gets its own results in its own order."""
    rng = random.Random(1)
    requests = [[make_sentence(rng) for _ in range(rng.randint(1, 3))] for _ in range(40)]
    every_sentence = [s for request in requests for s in request]
    expected = dict(zip(every_sentence, predictor.predict(every_sentence)))
    batch_sizes = []

    def recording_predict(sentences):
        batch_sizes.append(len(sentences))
        return predictor.predict(sentences)

    app = create_app(predictor, Settings(checkpoint=str(best_checkpoint), max_batch_size=8, max_wait_ms=200))
    with TestClient(app) as client:
        app.state.batcher.predict_batch = recording_predict
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda req: client.post("/predict", json={"sentences": req}), requests))
    for request, response in zip(requests, responses):
        assert response.status_code == 200
        results = response.json()
        assert [r["sentence"] for r in results] == request
        for result in results:  # the same answer as alone, up to padding in a different batch
            assert result["label"] == expected[result["sentence"]]["label"]
            assert result["probabilities"]["acceptable"] == pytest.approx(
                expected[result["sentence"]]["probabilities"]["acceptable"], abs=1e-5
            )
    assert sum(batch_sizes) == sum(map(len, requests))
    assert max(batch_sizes) <= 8 and max(batch_sizes) > 3  # gathered across requests, never over the cap


@pytest.mark.parametrize(
    "request_args, status, message",
    [
        (dict(content="{not json", headers={"content-type": "application/json"}), 400,
         "body is not valid JSON: Expecting property name enclosed in double quotes at character 1"),
        # A raw control character (dev.tsv has a backspace in one sentence) is invalid JSON: the client must escape it.
        (dict(content='{"sentences": ["A\x08dog."]}', headers={"content-type": "application/json"}), 400,
         "body is not valid JSON: Invalid control character at character 17"),
        (dict(content='{"sentences": ["A dog."]}'), 400, "Content-Type: application/json"),
        (dict(), 422, "body: Field required"),
        (dict(json=["A dog."]), 422, "body: Input should be a valid dictionary"),
        (dict(json={"sentences": "A dog."}), 422, "sentences: Input should be a valid list"),
        (dict(json={"sentences": ["A dog.", 3]}), 422, "sentences[1]: Input should be a valid string"),
        (dict(json={"sentences": ["A dog."], "batch": 2}), 422, "batch: Extra inputs are not permitted"),
        (dict(content='{"sentences": ["\\ud800"]}', headers={"content-type": "application/json"}), 422,
         "sentences[0]: not valid Unicode text"),
        (dict(json={"sentences": ["A dog."] * 5}), 413, "5 sentences: at most 4 per request"),
        (dict(json={"sentences": ["A dog.", "a" * 41]}), 413, "sentences[1] has 41 characters: at most 40"),
        (dict(json={"sentences": ["A dog. " * 3] * 4}), 413, "request body over 80 bytes"),
        (dict(content=iter([b'{"sentences": [', b'"A dog.", ' * 9, b'"A dog."]}']),  # chunked: no Content-Length
              headers={"content-type": "application/json"}), 413, "request body over 80 bytes"),
    ],
)
def test_bad_requests_get_a_status_and_a_clear_message(predictor, best_checkpoint, request_args, status, message):
    limits = dict(max_sentences=4, max_chars=40, max_body_bytes=80)
    with client_for(predictor, best_checkpoint, **limits) as client:
        response = client.post("/predict", **request_args)
        assert response.status_code == status
        assert message in response.json()["detail"]
        # ...and the server goes on answering.
        assert client.post("/predict", json={"sentences": SENTENCES[:1]}).json() == predictor.predict(SENTENCES[:1])


def test_a_bad_request_among_concurrent_good_ones_affects_none(predictor, best_checkpoint):
    app = create_app(predictor, Settings(checkpoint=str(best_checkpoint), max_wait_ms=100))
    bodies = [{"sentences": [s]} for s in SENTENCES] + [{"sentences": [1]}, {"sentences": ["\ud800"]}] * 2
    with TestClient(app) as client, ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: client.post("/predict", content=json.dumps(body),
                                                            headers={"content-type": "application/json"}), bodies))
    assert [r.status_code for r in responses] == [200] * 3 + [422] * 4
    assert [r.json()[0] for r in responses[:3]] == [predictor.predict([s])[0] for s in SENTENCES]


# The batcher on its own, with a stand-in model that records its calls.


def run_batcher(jobs: list[list[str]], max_batch_size: int, max_wait_ms: float, delays=None, fail_first=False):
    """Submit jobs (delays[i] seconds after the start), return (each job's results, the model calls)."""
    calls = []

    def predict(sentences):
        calls.append(list(sentences))
        if fail_first and len(calls) == 1:
            raise RuntimeError("model failed")
        return [s.upper() for s in sentences]

    async def main():
        batcher = MicroBatcher(predict, max_batch_size, max_wait_ms)

        async def submit(job, delay):
            await asyncio.sleep(delay)
            return await batcher.predict(job)

        runner = asyncio.create_task(batcher.run())
        try:
            return await asyncio.gather(*(submit(j, d) for j, d in zip(jobs, delays or [0] * len(jobs))),
                                        return_exceptions=True)
        finally:
            runner.cancel()

    return asyncio.run(main()), calls


def test_batcher_caps_batches_and_never_splits_a_request():
    jobs = [[f"s{i}"] for i in range(10)]
    results, calls = run_batcher(jobs, max_batch_size=4, max_wait_ms=50)
    assert results == [[f"S{i}"] for i in range(10)]
    assert [len(c) for c in calls] == [4, 4, 2]
    # A request that would overfill the batch waits for the next one; one over the cap is a call of its own.
    results, calls = run_batcher([["a", "b", "c"], ["d", "e"], ["f", "g", "h", "i", "j", "k"]], 4, 50)
    assert results == [["A", "B", "C"], ["D", "E"], ["F", "G", "H", "I", "J", "K"]]
    assert calls == [["a", "b", "c"], ["d", "e"], ["f", "g", "h", "i", "j", "k"]]


def test_batcher_waits_for_more_sentences_only_until_the_batch_is_full():
    # Second request 20 ms after the first, within the wait: one call.
    results, calls = run_batcher([["a"], ["b"]], max_batch_size=4, max_wait_ms=5000, delays=[0, 0.02])
    assert calls == [["a", "b"]] and results == [["A"], ["B"]]
    # A full batch goes at once rather than after the 60 s wait; without a wait, each request is its own call.
    started = time.monotonic()
    _, calls = run_batcher([["a"], ["b"]], max_batch_size=2, max_wait_ms=60_000)
    assert calls == [["a", "b"]] and time.monotonic() - started < 30
    _, calls = run_batcher([["a"], ["b"]], max_batch_size=1, max_wait_ms=0)
    assert calls == [["a"], ["b"]]
    # No wait still gathers the requests that queued up meanwhile.
    _, calls = run_batcher([["a"], ["b"], ["c"]], max_batch_size=4, max_wait_ms=0)
    assert calls == [["a", "b", "c"]]


def test_batcher_survives_a_failed_model_call():
    results, calls = run_batcher([["a"], ["b"]], max_batch_size=1, max_wait_ms=0, fail_first=True)
    assert isinstance(results[0], RuntimeError) and results[1] == ["B"]


# A real `python serve.py` process.


def start_server(checkpoint: Path, *args: str, log: Optional[Path] = None) -> tuple[subprocess.Popen, str]:
    """`python serve.py --checkpoint checkpoint ARGS` on a free loopback port, once /health answers."""
    log = log or Path(tempfile.mkdtemp()) / "serve.log"
    try:
        return serve_load.start_server(str(checkpoint), list(args), log)
    except RuntimeError as e:
        pytest.fail(str(e))


def test_sigterm_finishes_the_request_in_flight_then_exits(best_checkpoint, predictor, tmp_path):
    # The batcher holds the request for 3 s (it waits for more sentences): SIGTERM arrives meanwhile.
    log = tmp_path / "serve.log"
    process, url = start_server(best_checkpoint, "--max_wait_ms", "3000", log=log)
    try:
        responses = []
        request = threading.Thread(
            target=lambda: responses.append(httpx.post(f"{url}/predict", json={"sentences": SENTENCES}, timeout=60))
        )
        request.start()
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        request.join(timeout=60)
        # After its graceful shutdown, uvicorn raises the signal again: the usual exit status of a SIGTERM.
        assert process.wait(timeout=60) == -signal.SIGTERM
    finally:
        process.kill()
    output = log.read_text()
    assert responses and responses[0].status_code == 200, output[-3000:]
    assert responses[0].json() == predictor.predict(SENTENCES)
    assert "Waiting for connections to close" in output or "Shutting down" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)


def test_start_up_errors_are_one_line(tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, str(REPO / "serve.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})

    result = serve()
    assert result.returncode == 1 and result.stderr.startswith("error: no trained run under logs/cola")
    result = serve("--checkpoint", "missing.ckpt")
    assert result.returncode == 1 and result.stderr == "error: missing.ckpt: checkpoint not found\n"
    result = serve("--max_batch_size", "0")
    assert result.returncode == 2 and result.stderr == "error: --max_batch_size must be at least 1, not 0\n"
    result = serve("--port", "99999")  # was a traceback from the socket's bind()
    assert result.returncode == 2 and result.stderr == "error: --port must be 0-65535 (0: any free port), not 99999\n"


@pytest.mark.slow
def test_hey_benchmark_reports_goodput_and_refusals(best_checkpoint):
    if shutil.which("hey") is None:
        message = "hey is not installed (apt-get install hey)"
        if os.environ.get("CI") == "true":  # .ci/run installs it: missing there is a failure
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve_hey.py"), "--checkpoint", str(best_checkpoint),
         "--connections", "64", "--seconds", "1", "--serve_options", "--max_queue 2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 1, result.stdout
    assert float(rows[0][1]) > 0 and rows[0][5] == "none", rows  # answers, and none but 200 and 503
    assert float(rows[0][4].rstrip("%")) > 0  # 64 connections against a queue of 2: some refused


@pytest.mark.slow
def test_load_benchmark_runs_batched_and_unbatched(best_checkpoint, tiny_data_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--checkpoint", str(best_checkpoint),
         "--sentences", str(tiny_data_dir / "dev.tsv"), "--clients", "2,4", "--seconds", "1", "--warmup", "0.2",
         "--json", str(tmp_path / "load.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "load.json").read_text())["rows"]
    assert [(row["row"], row["clients"]) for row in rows] == [("batched", 2), ("batched", 4), ("unbatched", 2),
                                                               ("unbatched", 4)]
    for row in rows:
        assert row["errors"] == 0 and row["refused_share"] == 0 and row["requests_per_s"] > 0
        assert row["sentences_per_s"] == row["requests_per_s"] and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["peak_rss_mb"] > 50  # Python, ONNX Runtime and the model at least
    assert "batched / unbatched:" in result.stdout and "Predictor.predict in one process:" in result.stdout
    assert "batched: p99 of accepted requests at 4 clients / at 2:" in result.stdout


def test_a_model_failure_is_a_json_500_and_a_damaged_hparams_yaml_no_crash(predictor, best_checkpoint, tmp_path):
    run = tmp_path / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / best_checkpoint.name
    checkpoint.write_bytes(b"")  # only its name and folder are read here
    (run / "hparams.yaml").write_text("a: [")  # not YAML: /health names no model rather than fail

    class Failing:
        def predict(self, sentences, batch_size):
            raise RuntimeError("out of memory")

    with TestClient(create_app(Failing(), Settings(checkpoint=str(checkpoint))), raise_server_exceptions=False) as client:
        assert client.get("/health").json()["model"] is None
        response = client.post("/predict", json={"sentences": ["The dog sat."]})
    assert response.status_code == 500
    assert response.json() == {"detail": "the model failed on this batch (RuntimeError)"}


# Overload and clients that go away, against a real uvicorn server in this process and a stand-in model.


class HeldModel:
    """A stand-in for Predictor whose calls are recorded and held (the model busy) until release is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[list[str]] = []

    def predict(self, sentences: list[str], batch_size: int) -> list[dict]:
        self.calls.append(list(sentences))
        self.release.wait(timeout=60)
        return [{"sentence": s, "label": "acceptable", "probabilities": {"unacceptable": 0.0, "acceptable": 1.0}}
                for s in sentences]


@contextmanager
def served(app) -> Iterator[str]:
    """app on a free loopback port, served by uvicorn in a thread (as serve.py serves it), until the end."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def post_in_background(url: str, sentences: list[str]) -> tuple[threading.Thread, list]:
    responses: list = []
    thread = threading.Thread(
        target=lambda: responses.append(httpx.post(f"{url}/predict", json={"sentences": sentences}, timeout=60)))
    thread.start()
    return thread, responses


def wait_until(condition, what: str) -> None:
    """Polls condition() (state of the server in this process) rather than sleeping a guessed time."""
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"60 s and still not: {what}")
        time.sleep(0.02)


def predict_requests(metrics_text: str, status: str) -> float:
    prefix = f'cola_requests_total{{endpoint="/predict",status="{status}"}} '
    return sum(float(line[len(prefix):]) for line in metrics_text.splitlines() if line.startswith(prefix))


def test_beyond_max_queue_a_request_gets_503_with_retry_after(best_checkpoint):
    model = HeldModel()
    app = create_app(model, Settings(checkpoint=str(best_checkpoint), max_wait_ms=0, max_queue=2))
    with served(app) as url:
        busy, busy_responses = post_in_background(url, ["busy"])  # the model works on it until released
        wait_until(lambda: model.calls, "the model busy")
        queued, queued_responses = post_in_background(url, ["q1", "q2"])  # waits: 2 sentences queued
        wait_until(lambda: app.state.batcher.queued == 2, "2 sentences queued")
        started = time.monotonic()
        refused = httpx.post(f"{url}/predict", json={"sentences": ["one too many"]}, timeout=60)
        held = time.monotonic() - started
        refused_larger = httpx.post(f"{url}/predict", json={"sentences": ["x", "y"]}, timeout=60)
        model.release.set()
        busy.join(60)
        queued.join(60)
        # The queue empties, and then a request larger than max_queue, alone, is still answered.
        larger = httpx.post(f"{url}/predict", json={"sentences": ["a", "b", "c"]}, timeout=60)
        metrics = httpx.get(f"{url}/metrics").text
    for answer in (refused, refused_larger):  # held REFUSAL_HOLD_S, so that an immediate retry cannot flood
        assert answer.status_code == 503 and answer.headers["retry-after"] == "0"
        assert answer.json()["detail"] == "overloaded: 2 sentences are waiting already, at most 2 may; held 1 s, retry now"
    assert REFUSAL_HOLD_S <= held < REFUSAL_HOLD_S + 5
    assert [busy_responses[0].status_code, queued_responses[0].status_code, larger.status_code] == [200] * 3
    assert model.calls == [["busy"], ["q1", "q2"], ["a", "b", "c"]]
    assert predict_requests(metrics, "503") == 2 and predict_requests(metrics, "200") == 3


def test_a_request_whose_client_went_away_costs_no_model_time(best_checkpoint):
    model = HeldModel()
    app = create_app(model, Settings(checkpoint=str(best_checkpoint), max_wait_ms=0))
    with served(app) as url:
        busy, busy_responses = post_in_background(url, ["busy"])
        wait_until(lambda: model.calls, "the model busy")
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"sentences": ["gone"]}).encode()
        with socket.create_connection(("127.0.0.1", port)) as client:  # queued behind "busy", then gone
            client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: app.state.batcher.queued == 1, "the request queued")
        wait_until(lambda: predict_requests(httpx.get(f"{url}/metrics").text, "499") == 1, "the client seen gone")
        model.release.set()
        busy.join(60)
        after = httpx.post(f"{url}/predict", json={"sentences": ["after"]}, timeout=60)
        metrics = httpx.get(f"{url}/metrics").text
    assert busy_responses[0].status_code == 200 and after.status_code == 200
    assert model.calls == [["busy"], ["after"]]  # "gone" never reached the model
    assert predict_requests(metrics, "499") == 1  # counted as nginx counts a client that closed: 499
    assert "cola_queued_sentences 0.0" in metrics


def test_nothing_sent_to_a_client_names_a_server_path(predictor, best_checkpoint, trained, tiny_model_dir):
    """Every kind of answer: the page, /health, /metrics, /docs and its files, the OpenAPI schema, results,
    each error status (400, 404, 405, 413, 422, 500, 503)."""
    workdir, _ = trained
    server_paths = {str(REPO), str(workdir), str(best_checkpoint.parent), str(tiny_model_dir), sys.prefix,
                    str(Path.home()), tempfile.gettempdir()}

    class FailsOnSecondCall:
        calls = 0

        def predict(self, sentences, batch_size):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError(f"cannot read {best_checkpoint}")  # the message must not reach the client
            return predictor.predict(sentences, batch_size=batch_size)

    app = create_app(FailsOnSecondCall(), Settings(checkpoint=str(best_checkpoint), max_queue=1, max_chars=40))
    answers = []
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/", "/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/missing", "/predict",
                     "/static-offline-docs/swagger-ui.css"):
            answers.append(client.get(path))
        for body in ({"sentences": SENTENCES}, {"sentences": SENTENCES}, {"sentences": ["a" * 41]}, {"x": 1}):
            answers.append(client.post("/predict", json=body))
        answers.append(client.post("/predict", content="{", headers={"content-type": "application/json"}))
        app.state.batcher.queued = 1  # as if a sentence were waiting: the next request is refused
        answers.append(client.post("/predict", json={"sentences": SENTENCES[:1]}))
        app.state.batcher.queued = 0
        answers.append(client.get("/health"))
    statuses = {answer.status_code for answer in answers}
    assert statuses >= {200, 400, 404, 405, 413, 422, 500, 503}, statuses
    for answer in answers:
        sent = answer.text + "".join(f"{name}: {value}" for name, value in answer.headers.items())
        leaked = [path for path in server_paths if path in sent]
        assert not leaked, f"{answer.request.method} {answer.request.url.path} ({answer.status_code}) names {leaked}"


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_ends_even_with_a_stalled_upload_and_exits_with_its_status(best_checkpoint, tmp_path, workers):
    """A client that never finishes sending its body would hold a graceful shutdown forever: the server ends, by
    SIGTERM, as a finished shutdown does. Issue 44: on e28d847 it waited GRACEFUL_SHUTDOWN_S, then the stalled
    client got a plain-text 500 and the log a CancelledError traceback; now it gets a JSON 503 at once."""
    log = tmp_path / "serve.log"
    process, url = start_server(best_checkpoint, "--workers", str(workers), log=log)
    try:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n{\"sentences\": [")
            time.sleep(1)
            process.send_signal(signal.SIGTERM)
            stalled.settimeout(GRACEFUL_SHUTDOWN_S - 1)
            answer = b""
            while chunk := stalled.recv(65536):
                answer += chunk
            status = process.wait(timeout=GRACEFUL_SHUTDOWN_S + 60)  # without the bound: no end, a timeout here
    finally:
        process.kill()
    output = log.read_text()
    assert status == -signal.SIGTERM, output[-3000:]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and json.loads(body)["detail"].startswith("the server is shutting down"), answer
    assert "Traceback" not in output and "CancelledError" not in output and "timeout graceful shutdown exceeded" not in output


def test_a_checkpoint_written_over_under_a_torch_server_changes_no_answer(best_checkpoint, input_sensitive_checkpoint, tmp_path):
    """`cp other.ckpt served.ckpt` under a running server writes the same file (inode): the server answers
    with the weights it checked at start, and /health still names them."""
    served = tmp_path / "served.ckpt"
    shutil.copyfile(best_checkpoint, served)
    process, url = start_server(served, "--backend", "torch")
    try:
        before = httpx.post(f"{url}/predict", json={"sentences": SENTENCES}, timeout=60).json()
        health = httpx.get(f"{url}/health").json()
        inode = served.stat().st_ino
        shutil.copyfile(input_sensitive_checkpoint, served)  # as cp does: truncate, then write
        assert served.stat().st_ino == inode
        other = Predictor(served, backend="torch").predict(SENTENCES)
        assert other != before  # the new bytes would answer otherwise
        assert httpx.post(f"{url}/predict", json={"sentences": SENTENCES}, timeout=60).json() == before
        assert httpx.get(f"{url}/health").json() == health
    finally:
        process.kill()


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # a zombie has exited
    except psutil.NoSuchProcess:
        return False


def test_workers_exit_when_their_supervisor_is_killed(best_checkpoint, tmp_path):
    """kill -9 of `serve.py --workers 2` (or the OOM killer) tells its workers nothing: they must notice and
    go, freeing the port for the next start."""
    process, url = start_server(best_checkpoint, "--workers", "2", log=tmp_path / "serve.log")
    children = psutil.Process(process.pid).children()
    assert len(children) >= 2, children  # the two workers (and multiprocessing's resource tracker)
    process.kill()
    process.wait(timeout=10)
    deadline = time.monotonic() + 15
    while any(map(running, children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(running, children)), (tmp_path / "serve.log").read_text()[-3000:]
    with socket.socket() as free:  # nothing listens on the port any more
        free.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        free.bind(("127.0.0.1", int(url.rsplit(":", 1)[1])))


def test_health_of_an_export_made_from_a_local_model_names_no_path(best_checkpoint, tiny_model_dir, tmp_path):
    """An export served without its run folder (the image) names its base model from its own metadata,
    where the training machine's folder is absolute: only its last two names reach a client."""
    shutil.copy(best_checkpoint.with_suffix(".onnx"), tmp_path)
    predictor = Predictor(tmp_path)
    assert Path(predictor.base_model) == tiny_model_dir  # what the export holds
    with client_for(predictor, tmp_path / best_checkpoint.with_suffix(".onnx").name) as client:
        health = client.get("/health").json()
        page_facts = client.get("/metrics").text
    assert health["model"] == f"{tiny_model_dir.parent.name}/{tiny_model_dir.name}"
    assert str(tiny_model_dir) not in json.dumps(health) + page_facts


def test_a_burst_far_above_max_queue_gets_only_200_or_a_held_503_with_retry_after(best_checkpoint, tmp_path):
    """300 requests at once at a real server taking 4 waiting sentences: every answer is a result or a 503
    with Retry-After and a JSON detail, nothing else (no 400, 499 or 500), and the refusals come held."""
    process, url = start_server(best_checkpoint, "--max_queue", "4", log=tmp_path / "serve.log")

    async def burst() -> list[tuple[httpx.Response, float]]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            async def one(i: int) -> tuple[httpx.Response, float]:
                started = time.monotonic()
                response = await client.post("/predict", json={"sentences": [SENTENCES[i % 3]]})
                return response, time.monotonic() - started
            return await asyncio.gather(*(one(i) for i in range(300)))

    try:
        answers = asyncio.run(burst())
        assert process.poll() is None  # still serving
        assert httpx.post(f"{url}/predict", json={"sentences": SENTENCES}, timeout=60).status_code == 200
    finally:
        process.kill()
    statuses = {response.status_code for response, _ in answers}
    assert statuses == {200, 503}, (statuses, (tmp_path / "serve.log").read_text()[-2000:])
    for response, seconds in answers:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "0" and response.json()["detail"].startswith("overloaded:")
            assert seconds >= REFUSAL_HOLD_S
        else:
            assert [result["sentence"] for result in response.json()] == json.loads(response.request.content)["sentences"]
