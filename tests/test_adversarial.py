"""Adversarial cases, by surface: what a hostile client, a careless operator or an unlucky machine does to the
project. Each docstring says what the case found on 11aed9d (the commit before this module) and what was fixed,
or that the project held already. Found means: the case fails on 11aed9d.

- the HTTP server at the protocol level (raw sockets on loopback, bounded in time) and its API fuzzed from its
  own OpenAPI schema with schemathesis;
- files written by a process killed with -9 at each write;
- the environment a process inherits (variables, a port in use, a missing temp folder);
- every input reader at its limits (files, YAML, URLs).

The four serious classes of issue 37 are here: idle sockets that took the server down, passwords in output,
memory that grew with the input, and search spaces checked by half.
"""

import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

import checkpoints
from benchmarks import serve_load
from callbacks import AtomicCheckpointIO
from conftest import REPO, run_script, tiny_train_args
from export import export_hf, onnx_export

SENTENCES = ["The dog sat on the mat.", "Mat the on sat dog the."]
DEADLINE_S = 2.0  # --request_timeout_s of the servers below: short, so that the cases end soon


@pytest.fixture(scope="module")
def best_checkpoint(trained) -> Path:
    workdir, _ = trained
    return workdir / json.loads((workdir / "logs/cola/version_0/metrics.json").read_text())["best_model_path"]


def start_server(checkpoint: Path, log: Path, *options: str, **kwargs) -> SimpleNamespace:
    try:
        process, url = serve_load.start_server(str(checkpoint), list(options), log, **kwargs)
    except RuntimeError as e:
        pytest.fail(str(e))
    return SimpleNamespace(process=process, url=url, port=int(url.rsplit(":", 1)[1]), log=log)


@pytest.fixture(scope="module")
def server(best_checkpoint, tmp_path_factory):
    """serve.py with a 2 s request deadline and at most 40 connections."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    served = start_server(best_checkpoint, log, "--request_timeout_s", str(DEADLINE_S), "--max_connections", "40")
    yield served
    served.process.terminate()
    served.process.wait(timeout=30)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """What the server sends within `seconds`, and whether it closed the connection by then."""
    data, deadline = b"", time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def trickle(sock: socket.socket, data: bytes, every_s: float = 0.25, limit_s: float = 10) -> tuple[bytes, float]:
    """Sends data a few bytes at a time until the server answers or closes; (its answer, seconds taken)."""
    started = time.monotonic()
    for i in range(0, len(data), 4):
        if select.select([sock], [], [], 0)[0] or time.monotonic() - started > limit_s:
            break
        try:
            sock.sendall(data[i : i + 4])
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(every_s)
    answer, _ = read_until_closed(sock, limit_s)
    return answer, time.monotonic() - started


def still_answers(url: str) -> None:
    started = time.monotonic()
    response = httpx.post(f"{url}/predict", json={"sentences": SENTENCES}, timeout=10)
    assert response.status_code == 200 and len(response.json()) == 2
    assert time.monotonic() - started < 2, "answered, but slowly"


# The HTTP server, at the protocol level.


def test_idle_sockets_beyond_the_open_files_limit_leave_the_server_answering_everyone_else(best_checkpoint, tmp_path):
    """Found: with 256 open files allowed, 400 sockets that send nothing stopped the server answering anyone (the
    kernel queued /health, never accepted) and asyncio logged a traceback per failed accept(): 130 MB in 20 s.
    Fixed: serve.py fits its connections and accept backlog into the open-files limit (raising the soft limit
    first), answers 503 beyond them, and closes a connection that has not sent a whole request within
    --request_timeout_s; refusals and timeouts are logged as counts, every 10 s."""
    log = tmp_path / "serve.log"
    limited = start_server(best_checkpoint, log, "--request_timeout_s", "3",
                           preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    idle = []
    try:
        for _ in range(400):
            idle.append(connect(limited.port))
        for _ in range(3):
            still_answers(limited.url)
        time.sleep(3 + 1)
        closed = [read_until_closed(sock, 2)[1] for sock in idle]
        assert all(closed), f"{closed.count(False)} of 400 idle connections still open after the deadline"
        still_answers(limited.url)
    finally:
        for sock in idle:
            sock.close()
        limited.process.terminate()
        limited.process.wait(timeout=30)
    output = log.read_text()
    assert "Too many open files" not in output and len(output) < 20_000, output[-2000:]
    assert "note: the open-files limit (256, ulimit -n) fits" in output


def test_beyond_max_connections_the_longest_waiting_one_makes_room(server):
    """Found: no bound on open connections (one client held 19,500), and with a bound alone, 720 idle sockets (the
    1,024 open files' share) shut everyone else out for the deadline's 10 s. Fixed: at --max_connections, a new
    connection closes the one that has waited longest for its client's request, as nginx closes idle keep-alive
    connections when it runs out: the newcomer is served."""
    time.sleep(DEADLINE_S + 0.5)  # earlier cases' connections are gone
    held = [connect(server.port) for _ in range(40)]
    try:
        time.sleep(0.3)
        still_answers(server.url)
        assert read_until_closed(held[0], 2)[1]  # the oldest made room
        assert not select.select(held[1:], [], [], 0.2)[0]  # the others wait for their deadline, untouched
    finally:
        for sock in held:
            sock.close()


def test_a_connection_beyond_max_connections_all_busy_gets_503_with_retry_after(best_checkpoint, tmp_path):
    """With every connection's request in the app (held 3 s by --max_wait_ms), a new one is answered 503 with
    Retry-After and closed at once; the requests in flight are answered."""
    busy = start_server(best_checkpoint, tmp_path / "serve.log", "--max_connections", "4", "--max_wait_ms", "3000",
                        "--max_batch_size", "64")
    try:
        body = json.dumps({"sentences": SENTENCES}).encode()
        request = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(body), body))
        in_flight = [connect(busy.port) for _ in range(4)]
        for sock in in_flight:
            sock.sendall(request)
        time.sleep(0.5)
        with connect(busy.port) as extra:
            answer, closed = read_until_closed(extra, 5)
        assert closed and answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower(), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"].startswith("4 requests are being answered")
        for sock in in_flight:
            assert read_until_closed(sock, 10)[0].startswith(b"HTTP/1.1 200 ")
            sock.close()
    finally:
        busy.process.terminate()
        busy.process.wait(timeout=30)


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(server):
    """Found: kept forever (uvicorn's keep-alive timeout starts only after a first answer). Fixed: closed after
    --request_timeout_s, without an answer (nothing was asked)."""
    with connect(server.port) as sock:
        started = time.monotonic()
        answer, closed = read_until_closed(sock, DEADLINE_S + 3)
    assert closed and answer == b"" and DEADLINE_S - 0.5 < time.monotonic() - started < DEADLINE_S + 2


def test_headers_trickled_a_few_bytes_at_a_time_get_408_at_the_deadline(server):
    """Found: a header line sent 4 bytes every 0.25 s (slowloris) was waited for indefinitely. Fixed: the deadline
    counts from the connection's start, and trickled bytes do not move it: 408, then closed."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 400 + b"\r\n\r\n"
    with connect(server.port) as sock:
        answer, took = trickle(sock, request)
    assert answer.startswith(b"HTTP/1.1 408 ") and took < DEADLINE_S + 2, (answer, took)
    still_answers(server.url)


def test_a_body_trickled_in_pieces_gets_408_at_the_deadline(server):
    """Found: a body of Content-Length 2000 sent 4 bytes every 0.25 s held its connection and its request for
    the 2 minutes it takes. Fixed: 408 at the deadline; the request, cancelled, cost no model time."""
    body = json.dumps({"sentences": ["The dog sat on the mat." * 40]}).encode()[:2000]
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    with connect(server.port) as sock:
        sock.sendall(head)
        answer, took = trickle(sock, body)
    assert answer.startswith(b"HTTP/1.1 408 ") and took < DEADLINE_S + 2, (answer, took)


def test_a_chunked_body_that_never_ends_gets_408_at_the_deadline(server):
    """Found: chunks of 5 bytes every 0.25 s, never the last one, kept the request open as long as they came.
    Fixed: 408 at the deadline."""
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    with connect(server.port) as sock:
        sock.sendall(head)
        answer, took = trickle(sock, b"5\r\n     \r\n" * 100, every_s=0.25)
    assert answer.startswith(b"HTTP/1.1 408 ") and took < DEADLINE_S + 2, (answer, took)


def test_an_idle_keep_alive_connection_is_closed_after_its_answer(server):
    """Held: uvicorn closes a kept-alive connection 5 s after its answer; now at the deadline (2 s here), and a
    byte every second no longer keeps it open."""
    with connect(server.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer, _ = read_until_closed(sock, 1)
        assert answer.startswith(b"HTTP/1.1 200 ")
        answer, took = trickle(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n", every_s=1.0)
    assert answer.startswith(b"HTTP/1.1 408 ") and took < DEADLINE_S + 2, (answer, took)


def test_a_request_the_model_works_on_longer_than_the_deadline_is_answered(best_checkpoint, tmp_path):
    """The deadline is for the client's sending, not the server's work: a whole request whose batch waits
    2.5 s (--max_wait_ms) on a server with a 1 s deadline is answered, not cut."""
    slow = start_server(best_checkpoint, tmp_path / "serve.log", "--request_timeout_s", "1", "--max_wait_ms", "2500")
    try:
        started = time.monotonic()
        response = httpx.post(f"{slow.url}/predict", json={"sentences": SENTENCES}, timeout=30)
        assert response.status_code == 200 and time.monotonic() - started > 2
    finally:
        slow.process.terminate()
        slow.process.wait(timeout=30)


def test_pipelined_requests_are_answered_in_order(server):
    """Held: two requests in one packet, then a POST: three answers, in order."""
    body = json.dumps({"sentences": ["A big cat ran."]}).encode()
    requests = (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"POST /predict HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    with connect(server.port) as sock:
        sock.sendall(requests)
        answer, closed = read_until_closed(sock, 10)
    assert closed and answer.count(b"HTTP/1.1 200 ") == 3 and answer.rindex(b'"ready"') < answer.index(b"A big cat ran.")


@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",  # a 70 KB header
    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Many: a\r\n" * 5_000 + b"\r\n",  # 5,000 headers
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nabcde",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # not a chunk size
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello to a plain-HTTP port
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",  # a NUL in a header value
    b"\x00\xff\xfe GARBAGE\r\n\r\n",
], ids=["70KB-header", "5000-headers", "length-abc", "length-negative", "length-plus", "two-lengths", "bad-chunk", "tls", "nul-in-header", "garbage"])
def test_malformed_requests_get_4xx_and_the_server_goes_on(server, request_bytes):
    """Held: h11 refuses each with 400 and closes. Found: headers over h11's 16 KiB sent in one piece were parsed and
    served (h11 bounds only what it waits for). Fixed: 431 for headers over 16 KiB in all. Found (issue 44): h11's
    400 was uvicorn's plain text, "Invalid HTTP request received."; the README promises a JSON detail. Fixed."""
    with connect(server.port) as sock:
        sock.sendall(request_bytes)
        answer, closed = read_until_closed(sock, 5)
    too_large = len(request_bytes) > 16 * 1024
    assert answer.startswith(b"HTTP/1.1 431 " if too_large else b"HTTP/1.1 400 "), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower() and json.loads(body)["detail"], answer[:300]
    assert closed or too_large  # a 431 is an answer like any other: the connection may go on
    still_answers(server.url)


def test_headers_too_large_sent_in_pieces_get_a_json_400(server):
    """Issue 44: a header over h11's 16 KiB bound, sent in pieces, was refused in uvicorn's plain text."""
    with connect(server.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(20):
                sock.sendall(b"a" * 1024)
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):  # answered and closed once past the bound: what is tested
            pass
        answer, closed = read_until_closed(sock, 5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head and json.loads(body)["detail"], answer[:300]
    still_answers(server.url)


def test_a_body_cut_short_by_its_client_costs_no_error(server):
    """Held: a client that promises 100 bytes, sends 10 and hangs up: no 500 counted, nothing logged as an error."""
    with connect(server.port) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"sentenc')
    time.sleep(0.5)
    still_answers(server.url)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'status="500"' not in metrics and "Traceback" not in server.log.read_text()


@pytest.mark.parametrize("body, status", [
    (b'{"sentences": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),  # nested 100,000 deep
    (b'{"sentences": ["\xff\xfe not UTF-8"]}', 400),
    (b'{"sentences": ["a", "b"], "sentences": 3}', 422),  # a duplicate key: the last one counts, as in JSON parsers
    (b'{"sentences": [' + b'"a",' * 64 + b'"a"]}', 413),  # 65 sentences
    (b"null", 422),
])
def test_hostile_json_bodies_get_a_4xx_with_one_line(server, body, status):
    """Held: each gets its 4xx and a one-line JSON detail, never a 500."""
    response = httpx.post(f"{server.url}/predict", content=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == status and "\n" not in response.json()["detail"], response.text[:300]


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda mode: mode.value)
def test_the_api_fuzzed_from_its_own_openapi_schema(server, mode):
    """schemathesis: requests generated from /openapi.json, valid (positive) and not (negative), each answer checked
    against the schema (status codes, content types, bodies) and for 5xx. Found: /predict's schema listed only 200
    and FastAPI's 422 (a list of errors), while it answers 400, 408, 413, 431, 503 and a one-line 422. Fixed:
    declared (serve.PREDICT_ERRORS). (schemathesis' own pytest plugin fails on pytest 9: its strategy, with
    Hypothesis, instead.)"""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def answers_as_documented(case: schemathesis.Case) -> None:
        case.call_and_validate()

    answers_as_documented()


# Files written by a process killed with -9 at each write.


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("writer", ["checkpoint", "onnx", "hf"])
def test_what_a_writer_killed_mid_write_left_is_removed_by_the_next_write_there(best_checkpoint, tmp_path, writer):
    """Found: kill -9 during a checkpoint save, an ONNX export or an --export left its temporary file (a 90 MB
    .onnx.tmp for MiniLM) or folder beside the target, and nothing ever removed it. Fixed: temporary files are
    named for their machine and process (checkpoints.temporary_path), and each atomic write first removes the
    ones whose process is gone; a live writer's stays."""
    folder = tmp_path / "out"
    folder.mkdir()
    target = {"checkpoint": folder / "last.ckpt", "onnx": folder / "model.onnx", "hf": folder / "exported"}[writer]
    dead = target.with_name(checkpoints.temporary_path(target).name.replace(f".{os.getpid()}.", f".{dead_pid()}."))
    live = checkpoints.temporary_path(target).with_name(checkpoints.temporary_path(target).name.replace(
        f".{os.getpid()}.", f".{os.getppid()}."))  # pytest's parent, alive
    dead.mkdir() if writer == "hf" else dead.write_bytes(b"half")
    live.write_bytes(b"being written")
    if writer == "checkpoint":
        AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    elif writer == "onnx":
        shutil.copy(best_checkpoint, folder / "run.ckpt")
        target = onnx_export(folder / "run.ckpt")
    else:
        export_hf(best_checkpoint, str(target))
    assert target.exists() and not dead.exists() and live.read_bytes() == b"being written"


@pytest.mark.slow  # ~20-35 s: the fast tier keeps the quicker tests of the same code
# One of the 15 slowest (~45 s): three inference.py processes killed in their export, then one that exports whole.
def test_kill_9_during_the_onnx_export_leaves_nothing_the_next_run_trips_on(best_checkpoint, tmp_path):
    """Held, now with nothing left behind: inference.py killed at three moments of its first-use export; the next
    run exports, answers, and leaves only the checkpoint and its export."""
    checkpoint = tmp_path / "best.ckpt"
    shutil.copy(best_checkpoint, checkpoint)
    command = [sys.executable, str(REPO / "inference.py"), "--checkpoint", str(checkpoint), "The dog sat."]
    for delay in (1.5, 2.5, 3.5):
        for path in tmp_path.glob("*.onnx"):
            path.unlink()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "The dog sat." in result.stdout, result.stderr[-2000:]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "best.onnx"]


def test_kill_9_of_a_workers_supervisor_leaves_no_metrics_folder_behind(best_checkpoint, tmp_path):
    """Found: `serve.py --workers 2` killed with -9 left its metrics folder in the temp folder for good (one per
    kill). Fixed: named for the supervisor's process, removed by the next start once that process is gone."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    first = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--checkpoint", str(best_checkpoint), "--workers", "2",
                              "--port", str(serve_load.free_port())], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(temp.glob("cola-serve-metrics-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    (left,) = temp.glob("cola-serve-metrics-*")
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(2)  # its workers follow it within 0.5 s (exit_with_supervisor)
    assert left.exists()
    second = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--checkpoint", str(best_checkpoint), "--workers", "2",
                               "--port", str(serve_load.free_port())], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while left.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left.exists(), "still there 2 minutes after the supervisor was killed"
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert not list(temp.glob("cola-serve-metrics-*"))  # and the second one removed its own


# The environment a process inherits.


def serve_once(best_checkpoint: Path, tmp_path: Path, env: dict) -> httpx.Response:
    port = serve_load.free_port()
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--checkpoint", str(best_checkpoint), "--port",
                                    str(port)], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                return httpx.post(f"http://127.0.0.1:{port}/predict", json={"sentences": SENTENCES}, timeout=5)
            except httpx.TransportError:
                time.sleep(0.3)
        pytest.fail((tmp_path / "serve.log").read_text()[-2000:])
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_an_inherited_prometheus_multiproc_dir_is_not_this_servers(best_checkpoint, tmp_path):
    """Found: PROMETHEUS_MULTIPROC_DIR left in the environment by another program put prometheus_client into its
    multiprocess mode: a traceback at the first request where the folder did not exist, mixed metrics where it
    did. Fixed: only --workers' own workers keep it."""
    assert serve_once(best_checkpoint, tmp_path, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")}).status_code == 200


def test_a_missing_temp_folder_is_passed_over(best_checkpoint, tmp_path):
    """Held: TMPDIR naming a folder that does not exist: Python's tempfile falls back to /tmp."""
    assert serve_once(best_checkpoint, tmp_path, {"TMPDIR": str(tmp_path / "missing")}).status_code == 200


def test_a_port_in_use_is_one_line_before_the_model_loads(best_checkpoint):
    """Found: the model loaded, then uvicorn's start, bind error and shutdown lines, exit 3. Fixed: the socket is
    bound first: one line naming the address, exit 1, in well under the model's load time."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(REPO / "serve.py"), "--checkpoint", str(best_checkpoint), "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use (another server there? give another --port)\n"


def test_stdout_that_takes_no_utf8_gets_escapes_not_a_traceback(trained):
    """Found: PYTHONIOENCODING=ascii (or a C locale without UTF-8) and a non-ASCII sentence: UnicodeEncodeError.
    Fixed: text output escapes what stdout cannot write; --json writes \\u escapes, the same JSON."""
    workdir, _ = trained
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    command = [sys.executable, str(REPO / "inference.py"), "Der Junge ißt café."]
    text = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and text.stdout.rstrip().endswith("Der Junge i\\xdft caf\\xe9."), text.stderr[-2000:]
    as_json = subprocess.run([*command, "--json"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["sentence"] == "Der Junge ißt café."


# Input readers at their limits.


def peak_rss_mb(command: list[str], cwd: Path, log: Path) -> float:
    """The peak resident memory of command's process (the kernel's own count, from wait4)."""
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr)
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-2000:]
    return usage.ru_maxrss / 1024


def test_inference_memory_stays_flat_whatever_the_number_and_length_of_lines(trained, tmp_path):
    """Found: 1,000 lines just under the 16 KiB line cap took 732 MB (10,000: 7.3 GB): the tokenizer's overflow
    pieces of every truncated line were kept for a whole 10,000-line chunk. Fixed: sentences are tokenized 64 at
    a time, only their ids kept, and a chunk ends at 4 MiB of input too. The README's bound: at most ~120 MB
    above what the model takes (short lines)."""
    workdir, _ = trained
    rng, words = random.Random(0), "the a boy girl dog cat sat ran saw is was on under bench mat".split()
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("The dog sat on the mat.\n" * 10)
    with open(long, "w") as f:
        for _ in range(1000):
            f.write(" ".join(rng.choice(words) for _ in range(4000))[: 16 * 1024 - 1] + "\n")
    command = [sys.executable, str(REPO / "inference.py"), "--json", "--file"]
    baseline = peak_rss_mb([*command, str(short)], workdir, tmp_path / "short.log")
    peak = peak_rss_mb([*command, str(long)], workdir, tmp_path / "long.log")
    assert peak - baseline < 120, f"{peak:.0f} MB for 1,000 long lines, {baseline:.0f} MB for 10 short ones"


SPACE_ERRORS = {
    "model.learning_rate: {low: 1.0e-5, high: .inf}": "model.learning_rate: inf is not a number a trial can take",
    "data.batch_size: {low: 1, high: 100000000000000000000000}": "data.batch_size: 100000000000000000000000 is not a number",
    "model.pooling: [cls, mean, bogus]": "model.pooling: bogus: --model.pooling: Expected a typing.Literal",
    "model.num_layers: {low: 1, high: 5}": "model.num_layers: 5: --model.num_layers 5:",
    "model.warmup_ratio: [0.1, 1.5]": "model.warmup_ratio: 1.5: --model.warmup_ratio must be at least 0 and below 1",
    "trainer.max_epochs: [2, 0]": "trainer.max_epochs: 0: --trainer.max_epochs must be at least 1",
    "data.batch_size: [8, 0]": "data.batch_size: 0: --data.batch_size must be at least 1",
    "model.pooling: [[cls], mean]": "model.pooling: a choice is a list; choices are strings, numbers, true/false or null",
    "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n": "over 100,000 values once its aliases",
}


@pytest.mark.parametrize("space, message", SPACE_ERRORS.items(), ids=["inf", "past-2**64", "unknown-choice", "layers-above-model",
                                                                      "warmup-1.5", "max-epochs-0", "batch-0", "list-choice", "billion-laughs"])
def test_every_value_of_a_search_space_is_checked_before_the_study_exists(tiny_model_dir, tiny_data_dir, tmp_path, space, message):
    """Found: only a choice list's first value and a range's low end were checked: `high: .inf` or an integer past
    64 bits was a 40-60-line traceback, an unknown choice or num_layers above the model's (2 here) a failed trial
    in a study left behind, a YAML alias bomb a line of millions of characters. Fixed: every choice and both ends
    of a range parsed as train.py parses them and checked as it checks before loading (train.check_config); finite
    bounds within 2**53 (Optuna keeps values as floats); choices scalars; YAML with at most 100,000 values."""
    (tmp_path / "space.yaml").write_text(space)
    result = run_script("tune.py", ["--search_space", "space.yaml", *tiny_train_args(tiny_model_dir, tiny_data_dir)], tmp_path,
                        timeout=300)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and len(result.stderr) < 400, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert not (tmp_path / "logs").exists()  # no study (logs/tune.db), no trial's run folder


def test_a_config_file_bomb_is_one_line(tiny_model_dir, tiny_data_dir, tmp_path):
    """Found: a 9-line --config whose YAML aliases expand to 43 million values: MemoryError (at 4 GB) or the OOM
    killer. Fixed: train.py's YAML loader counts values on the node graph first (readers.check_yaml_size)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    result = run_script("train.py", ["--config", "bomb.yaml", *tiny_train_args(tiny_model_dir, tiny_data_dir)], tmp_path,
                        timeout=300, memory_limit_gb=8)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "over 100,000 values once its aliases are expanded" in result.stderr and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("script, options, message", [
    ("train.py", ["--model.head_seed", str(2**64)], "error: --model.head_seed must be from 0 to 2**64 - 1"),
    ("tune.py", ["--model.head_seed", str(2**64)], "error: --model.head_seed must be from 0 to 2**64 - 1"),
    ("train.py", ["--data.task", "mine", "--data.text_columns", "[line]"], "error: --data.text_columns: 'line' names one of"),
])
def test_options_that_were_tracebacks_are_one_line(tiny_model_dir, tiny_data_dir, tmp_path, script, options, message):
    """Issue 44: on e28d847 a head seed of 2**64 was a 45-line traceback (through tune.py: a study with a failed trial),
    and a text column named `line` another."""
    result = run_script(script, [*tiny_train_args(tiny_model_dir, tiny_data_dir), *options], tmp_path, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Seed set to")]  # Lightning's
    assert len(said) == 1 and said[0].startswith(message), result.stderr
    assert not list(tmp_path.rglob("version_*")) and not list(tmp_path.rglob("*.db"))  # no run, no study


def run_under_memory_limit(script: str, args: list[str], cwd: Path, gigabytes: int = 4) -> subprocess.CompletedProcess:
    """A script run with its address space capped (RLIMIT_AS): an input that is not bounded ends in a MemoryError."""
    return run_script(script, ["--trainer.enable_progress_bar", "false", *args], cwd, timeout=300, memory_limit_gb=gigabytes)


@pytest.mark.parametrize("kind", ["cola", "jsonl"])
def test_a_huge_line_in_a_data_file_is_one_line_under_a_memory_limit(tiny_model_dir, tiny_data_dir, tmp_path, kind):
    """Issue 44: on e28d847 one 20 MB line in train.tsv trained, with a 5.9 GB peak (its tokenization)."""
    data = tmp_path / "data"
    data.mkdir()
    huge = "the dog sat " * ((20 << 20) // 12)  # 20 MB
    if kind == "cola":
        shutil.copy(tiny_data_dir / "dev.tsv", data / "dev.tsv")
        (data / "train.tsv").write_text("src\t1\t\tThe dog sat.\nsrc\t0\t\t" + huge + "\n", encoding="utf-8")
        args, name = [], "train.tsv"
    else:
        for split in ("train", "dev"):
            rows = [{"text": "The dog sat.", "label": 1}, {"text": huge if split == "dev" else "A cat.", "label": 0}]
            (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        args, name = ["--data.task", "mine", "--data.text_columns", "[text]"], "dev.jsonl"
    result = run_under_memory_limit("train.py", [*tiny_train_args(tiny_model_dir, data), *args], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Seed set to")]  # Lightning's
    assert said == [f"error: {data / name}:2: a line over 65,536 bytes is no example: is it the right file?"]


PASSWORD = "Pa55-w0rd.secret"


@pytest.mark.parametrize("url", [
    f"postgresql://user:{PASSWORD}@127.0.0.1:1/db",
    f"postgresql://user:{PASSWORD}@127.0.0.1:notaport/db",  # malformed: was echoed raw
    f"postgresql://user:{PASSWORD}@[::1/db",
    f"postgresql://user:{PASSWORD.replace('.', '%2E')}@127.0.0.1:1/db",  # percent-encoded
    f"postgresql://user:{PASSWORD}@with-an-at@127.0.0.1:1/db",  # an unescaped '@' in the password
    f"postgresql://127.0.0.1:1/db?user=user&password={PASSWORD}",
    f"mysql://user:{PASSWORD}@127.0.0.1:1/db",  # no driver installed
    f"postgresql:/postgres:{PASSWORD}@127.0.0.1:1/db",  # one slash: "Could not parse", with the URL (issue 44)
    f"postgresql:postgres:{PASSWORD}@127.0.0.1:1/db",  # none
])
def test_a_storage_password_is_in_no_line_whatever_the_url(tiny_model_dir, tiny_data_dir, tmp_path, url):
    """Found: the password was masked in one error of a well-formed URL and printed in others (a malformed URL
    echoed raw, then a traceback). Fixed: tune.py masks every password of --storage's URL, as typed and
    percent-decoded, in everything it prints (MaskedOutput on stdout and stderr, installed before any import)."""
    result = run_script("tune.py", ["--storage", url, *tiny_train_args(tiny_model_dir, tiny_data_dir)], tmp_path, timeout=300)
    assert result.returncode == 1 and result.stderr.startswith("error: --storage ") and result.stderr.count("\n") == 1, result.stderr
    for secret in (PASSWORD, PASSWORD.replace(".", "%2E"), "w0rd"):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize("option", [["--stor"], ["--sto"], ["--st"], ["--stor="]])
def test_a_storage_password_given_through_an_abbreviated_option_is_in_no_line(tiny_model_dir, tiny_data_dir, tmp_path, option):
    """Issue 44: argparse takes --stor for --storage, and masking looked for --storage alone."""
    url = f"postgresql:/postgres:{PASSWORD}@127.0.0.1:1/db"
    args = [option[0] + url] if option[0].endswith("=") else [option[0], url]
    result = run_script("tune.py", [*args, *tiny_train_args(tiny_model_dir, tiny_data_dir)], tmp_path, timeout=300)
    assert result.returncode in (1, 2) and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("option", ["--n_trials", "--heartbeat_seconds="])
def test_a_storage_url_given_to_another_option_shows_no_password(tmp_path, option):
    """Found in review: `--n_trials URL` (a slip of the keyboard) echoed the URL, its password too, in argparse's
    'invalid int value'. Now any argument shaped like a URL with user-info is masked as --storage's is."""
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/db"
    args = [option + url] if option.endswith("=") else [option, url]
    result = run_script("tune.py", args, tmp_path, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "invalid int value" in result.stderr and "***" in result.stderr and PASSWORD not in result.stdout + result.stderr


@pytest.mark.slow
# One of the 15 slowest (~30 s): a real PostgreSQL and a whole sweep (stopped, continued, finished, refused), every file read.
def test_a_password_in_a_postgresql_url_is_in_no_output_or_file_of_a_whole_sweep(postgres_url, tiny_model_dir, tiny_data_dir, tmp_path):
    """Found: with a password in --storage, the "ran other options" refusal, the "stopped:" line and the
    "Resume with:" lines after a signal printed it. Fixed (MaskedOutput): a sweep stopped by SIGTERM mid-trial,
    continued, finished, then run with other options: no output line and no file it wrote holds the password."""
    url = postgres_url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")  # trust auth: any password
    args = ["--storage", url, "--n_trials", "2", *tiny_train_args(tiny_model_dir, tiny_data_dir), "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false"]
    outputs = []
    env = {**os.environ, "FAULT": "pause_before_step:8", "FAULT_SCRIPT": "tune.py", "FAULT_MARKER": str(tmp_path / "paused")}
    stopped = subprocess.Popen([sys.executable, str(REPO / "tests" / "faulty_train.py"), *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "paused").exists():
        assert stopped.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    (tmp_path / "paused").unlink()
    outputs += stopped.communicate(timeout=300)
    assert stopped.returncode == 143 and "Resume with:" in outputs[0] and "continues the sweep" in outputs[1], outputs[1][-2000:]
    for extra in ([], ["--trainer.max_epochs", "1"]):  # finishes; then refused: "ran other options"
        result = subprocess.run([sys.executable, str(REPO / "tune.py"), *args, *extra], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        outputs += [result.stdout, result.stderr]
    assert "ran other options" in outputs[-1] and "postgresql://***@" in outputs[-1]  # the user too (issue 44: no user-info)
    leaks = [i for i, text in enumerate(outputs) if PASSWORD in text]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert not leaks and not files, (leaks, files)
