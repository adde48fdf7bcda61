"""serve.py's /metrics: exact counts in one process, the sum over --workers 2, and a real Prometheus server
(Debian's `prometheus` package; .ci/run installs it: under CI=true a missing one fails the test) scraping
it and answering a query about it."""

import http.client
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve_load import free_port
from serve import Settings, create_app
from test_serve import SENTENCES, best_checkpoint, predictor, start_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # a real Prometheus server and --workers processes: the fast tier leaves them to CI


def samples(metrics_text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels...): value} of a /metrics answer, parsed as Prometheus parses it."""
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
    }


def predict_count(metrics_text: str, status: str = "200") -> float:
    return samples(metrics_text).get(("cola_requests_total", ("endpoint", "/predict"), ("status", status)), 0.0)


def test_metrics_count_requests_sentences_labels_and_model_calls(predictor, best_checkpoint):  # noqa: F811
    requests = [SENTENCES, SENTENCES[:1], ["", SENTENCES[2]], SENTENCES[1:]]
    model_calls: list[int] = []
    app = create_app(predictor, Settings(checkpoint=str(best_checkpoint), max_chars=60))
    with TestClient(app) as client:
        predict_batch = app.state.batcher.predict_batch
        app.state.batcher.predict_batch = lambda sentences: model_calls.append(len(sentences)) or predict_batch(sentences)
        for sentences in requests:
            assert client.post("/predict", json={"sentences": sentences}).status_code == 200
        assert client.post("/predict", json={"sentences": [1]}).status_code == 422
        assert client.post("/predict", json={"sentences": ["a" * 61]}).status_code == 413
        health = client.get("/health").json()
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    got = samples(response.text)
    sent = [s for sentences in requests for s in sentences]
    labels = Counter(result["label"] for result in predictor.predict(sent) if "label" in result)
    assert predict_count(response.text, "200") == len(requests)
    assert predict_count(response.text, "422") == 1 and predict_count(response.text, "413") == 1
    assert got[("cola_requests_total", ("endpoint", "/health"), ("status", "200"))] == 1
    assert got[("cola_request_duration_seconds_count", ("endpoint", "/predict"))] == len(requests) + 2
    assert got[("cola_sentences_total",)] == len(sent)
    assert {key[1][1]: value for key, value in got.items() if key[0] == "cola_predictions_total"} == labels
    assert got[("cola_model_batch_sentences_count",)] == len(model_calls) == len(requests)  # one at a time
    assert got[("cola_model_batch_sentences_sum",)] == sum(model_calls) == len(sent)
    assert got[("cola_model_call_duration_seconds_count",)] == len(model_calls)
    assert got[("cola_queued_sentences",)] == 0
    info = [dict(key[1:]) for key in got if key[0] == "cola_model_info"]
    assert info == [{"checkpoint": health["checkpoint"], "sha256": health["sha256"],
                     "metric": "val_mcc", "score": str(health["score"]), "model": health["model"], "task": "cola"}]


def tcp_connections(process: psutil.Process) -> list:
    # psutil 6 renamed connections() net_connections(); olah (tests/test_hub.py), by fastapi-utils, holds psutil < 6.
    return (process.net_connections if hasattr(process, "net_connections") else process.connections)(kind="tcp")


def workers_of(server: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.pid).children(recursive=True) if tcp_connections(p)]


def connections_to_each_worker(server: subprocess.Popen, port: int, workers: int) -> list[http.client.HTTPConnection]:
    """Kept-alive connections, one accepted by each worker process (found by their client port), so that the
    requests sent over them are served by all workers."""
    held: dict[int, http.client.HTTPConnection] = {}
    for _ in range(50):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.connect()
        client_port = connection.sock.getsockname()[1]
        connection.request("GET", "/health")  # answered once a worker has accepted the connection
        connection.getresponse().read()
        for process in workers_of(server) if workers > 1 else [psutil.Process(server.pid)]:
            if any(c.raddr and c.raddr.port == client_port for c in tcp_connections(process)):
                held.setdefault(process.pid, connection)
        if len(held) == workers:
            return list(held.values())
    pytest.fail(f"50 connections, none accepted by some of the {workers} workers")


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_are_the_sum_over_workers_and_prometheus_reads_them(best_checkpoint, tmp_path, workers):  # noqa: F811
    process, url = start_server(best_checkpoint, "--workers", str(workers), log=tmp_path / "serve.log")
    port = int(url.rsplit(":", 1)[1])
    try:
        connections = connections_to_each_worker(process, port, workers)
        sent = 0
        for i, connection in enumerate(connections):
            for _ in range(3 + 2 * i):  # different counts per worker: a sum, not one worker's count twice
                connection.request("POST", "/predict", json.dumps({"sentences": SENTENCES}),
                                   {"Content-Type": "application/json"})
                assert connection.getresponse().read().startswith(b"[")
                sent += 1
        for _ in range(4):  # whichever worker answers the scrape: the total
            assert predict_count(httpx.get(f"{url}/metrics").text) == sent
            assert samples(httpx.get(f"{url}/metrics").text)[("cola_sentences_total",)] == sent * len(SENTENCES)
        assert prometheus_query(url, tmp_path, 'sum(cola_requests_total{endpoint="/predict",status="200"})', sent)
    finally:
        process.terminate()
        process.wait(timeout=60)


def prometheus_query(url: str, tmp_path: Path, query: str, expected: float) -> bool:
    """Starts Prometheus on a free loopback port, scraping url/metrics every 0.5 s, and polls its HTTP API
    with query until the answer is expected (True); fails with what it answered last after 60 s."""
    binary = shutil.which("prometheus")
    if binary is None:
        message = "Debian's prometheus is not installed: apt-get install prometheus"
        pytest.fail(message) if os.environ.get("CI") == "true" else pytest.skip(message)
    target = url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\nscrape_configs:\n"
                      f"  - job_name: cola\n    static_configs:\n      - targets: ['{target}']\n")
    api = f"http://127.0.0.1:{free_port()}"
    with open(tmp_path / "prometheus.log", "w") as log:
        prometheus = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={api.removeprefix('http://')}"], stdout=log, stderr=subprocess.STDOUT)
    answer = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and prometheus.poll() is None:
            try:
                answer = httpx.get(f"{api}/api/v1/query", params={"query": query}, timeout=5).json()
                result = answer["data"]["result"]
                if result and float(result[0]["value"][1]) == expected:
                    return True
            except (httpx.TransportError, ValueError, KeyError):  # not up yet
                pass
            time.sleep(0.5)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=60)
    pytest.fail(f"Prometheus never answered {expected} to {query}: last answer {answer}\n"
                f"{(tmp_path / 'prometheus.log').read_text()[-2000:]}")
