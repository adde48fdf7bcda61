"""Load on serve.py over the loopback address: N concurrent clients for T seconds, batching on and off.

    python benchmarks/serve_load.py --checkpoint logs/cola/version_0/checkpoints/best-....ckpt \\
        --sentences ../shared/data/cola/dev.tsv --rows batched,unbatched --clients 32 --seconds 20

Each row starts `python serve.py` with that row's options on a free loopback port, and once /health
answers, --clients clients each send one request at a time (--per_request sentences of the file, over
a kept-alive connection) for --warmup seconds, not counted, then --seconds, counted; then SIGTERM.
`--clients 32,256` runs each row at each count. A client told 503 (the server's queue is full) waits
the Retry-After it was given, as a well-behaved client does, then sends again.
It prints requests/s, sentences/s, p50/p95/p99 latency of the accepted (200) requests, the share
refused (503), other errors and the server's peak RSS (all its processes) per row, batched against
unbatched, and the served sentences/s as a share of Predictor.predict's in this process over the same
sentences (batches of 64, sorted by length): what the HTTP layer and batching per request cost. The
server's CPU ms per sentence (all its threads and workers) tells the same on a machine shared with
other work, where wall-clock rates depend on what else runs.
`--url http://127.0.0.1:PORT` loads a server that is already running instead (loopback only).
"""

import argparse
import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from readers import DataError, read_glue_tsv  # noqa: E402
from checkpoints import CheckpointError  # noqa: E402
from inference import Predictor, InputError  # noqa: E402

# serve.py options of each row.
ROWS = {
    "batched": [],
    "unbatched": ["--no_batching"],
    "batched_2_workers": ["--workers", "2"],
    "unbatched_2_workers": ["--no_batching", "--workers", "2"],
}
REQUEST_TIMEOUT_S = 30  # a request slower than this counts as an error


OK, REFUSED, ERROR = "ok", "refused", "error"


async def one_client(host: str, port: int, bodies, warm_from: float, end: float, records: list) -> None:
    """Requests one after another over one connection until `end`; records (latency s, sentences, outcome)
    of those sent after `warm_from`. A raw HTTP/1.1 client: an HTTP library would take CPU from the server."""
    loop = asyncio.get_running_loop()
    reader = writer = None
    while loop.time() < end:
        body, sentences = next(bodies)
        started = loop.time()
        retry_after = 0.0
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            outcome, retry_after = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):  # IndexError: closed
            outcome = ERROR
            if writer:
                writer.close()
            reader = writer = None  # a new connection for the next request
        if started >= warm_from:
            records.append((loop.time() - started, sentences, outcome))
        await asyncio.sleep(min(retry_after, max(0.0, end - loop.time())))
    if writer:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[str, float]:
    """Read one response: OK for a 200 with a JSON list, REFUSED for a 503 with a JSON detail (and its
    Retry-After seconds), else ERROR."""
    status = int((await reader.readline()).split()[1])
    length, retry_after = 0, 0.0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "retry-after":
            retry_after = float(value)
    body = await reader.readexactly(length)
    if status == 200 and body.startswith(b"["):
        return OK, 0.0
    if status == 503 and body.startswith(b'{"detail"'):
        return REFUSED, retry_after
    return ERROR, 0.0


async def load(url: str, sentences: list[str], clients: int, per_request: int, warmup: float, seconds: float) -> list:
    parts = urlsplit(url)
    # Each client starts at another place in the file, so concurrent requests carry different sentences.
    requests = [sentences[i : i + per_request] for i in range(0, len(sentences) - per_request + 1, per_request)]
    encoded = [(json.dumps({"sentences": r}).encode(), len(r)) for r in requests]
    loop = asyncio.get_running_loop()
    warm_from = loop.time() + warmup
    end = warm_from + seconds
    records: list = []
    await asyncio.gather(*(
        one_client(parts.hostname, parts.port, itertools.islice(itertools.cycle(encoded), i * 7, None), warm_from, end, records)
        for i in range(clients)
    ))
    return records


def summarize(name: str, clients: int, records: list, seconds: float) -> dict:
    """Rates and latency quantiles of the accepted requests, the share refused, the count of other errors."""
    latencies = sorted(latency for latency, _, outcome in records if outcome == OK)
    quantile = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {
        "row": name,
        "clients": clients,
        "requests_per_s": len(latencies) / seconds,
        "sentences_per_s": sum(n for _, n, outcome in records if outcome == OK) / seconds,
        "p50_ms": quantile(0.50), "p95_ms": quantile(0.95), "p99_ms": quantile(0.99),
        "refused_share": sum(outcome == REFUSED for *_, outcome in records) / max(1, len(records)),
        "errors": sum(outcome == ERROR for *_, outcome in records),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    checkpoint: Optional[str], options: list[str], log_path: Path, python: str = sys.executable, cwd: Optional[Path] = None,
    preexec: Optional[Callable[[], None]] = None,
) -> tuple[subprocess.Popen, str]:
    """`python serve.py --checkpoint checkpoint OPTIONS` (no --checkpoint for None: serve.py picks one in cwd's
    logs/cola) on a free loopback port, its output in log_path, once /health answers (also for the tests);
    RuntimeError with the log's end if it does not start. python: the interpreter (the tests' lean venv's, say);
    preexec: run in the child before serve.py (a resource limit, say)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [python, str(REPO / "serve.py"), *(["--checkpoint", checkpoint] if checkpoint else []), "--port", str(port), *options],
            stdout=log, stderr=subprocess.STDOUT, cwd=cwd, preexec_fn=preexec,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).json()["ready"]:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"serve.py {' '.join(options)} did not start:\n{log_path.read_text()[-2000:]}")


def server_cpu_seconds(pid: int) -> float:
    """CPU time (all threads) of the server and its worker processes so far."""
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(sum(p.cpu_times()[:2]) for p in processes)


class PeakRss(threading.Thread):
    """Samples the resident memory of the server and its worker processes (summed) every 0.1 s until stopped;
    .peak_mb is the largest sum seen."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_mb = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            try:
                server = psutil.Process(self.pid)
                rss = sum(p.memory_info().rss for p in [server, *server.children(recursive=True)])
            except psutil.Error:  # a worker ended between the listing and the reading
                continue
            self.peak_mb = max(self.peak_mb, rss / 2**20)


def in_process_sentences_per_s(checkpoint: str, sentences: list[str]) -> float:
    """Predictor.predict over all the sentences at once: the ceiling the server is measured against."""
    predictor = Predictor(checkpoint)
    predictor.predict(sentences[:64])  # warm-up
    started, cpu_started = time.perf_counter(), time.process_time()
    predictor.predict(sentences)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"Predictor.predict in one process: {len(sentences) / seconds:.0f} sentences/s,"
          f" {1000 * cpu_seconds / len(sentences):.2f} CPU ms per sentence")
    return len(sentences) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="the .ckpt file each row serves (with --rows)")
    parser.add_argument("--url", help="load this running server instead, e.g. http://127.0.0.1:8000")
    parser.add_argument("--sentences", type=Path, default=Path("../shared/data/cola/dev.tsv"), help="a GLUE CoLA TSV")
    parser.add_argument("--rows", default="batched,unbatched", help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--serve_options", default="", help="more serve.py options for every row, e.g. '--max_wait_ms 2'")
    parser.add_argument("--clients", default="32", help="concurrent clients; a comma-separated list runs each row at each")
    parser.add_argument("--per_request", type=int, default=1, help="sentences per request")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the counted ones")
    parser.add_argument("--seconds", type=float, default=20.0, help="counted seconds of load per row")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    rows = args.rows.split(",")
    try:
        client_counts = [int(count) for count in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients must be comma-separated whole numbers, not {args.clients!r}")
    if not args.url and (not args.checkpoint or not all(row in ROWS for row in rows)):
        parser.error(f"give --checkpoint and --rows of {', '.join(ROWS)}, or --url")
    if args.url and urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--url must be on the loopback address: this sends load only to this machine")
    if min(client_counts) < 1 or args.per_request < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--clients and --per_request must be at least 1, --seconds above 0, --warmup 0 or more")
    try:
        sentences = [row["sentence"] for row in read_glue_tsv(args.sentences)]
    except DataError as e:
        sys.exit(f"error: {e}")
    if args.per_request > len(sentences):
        sys.exit(f"error: --per_request {args.per_request}: {args.sentences} has only {len(sentences)} sentences")

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start; {args.clients} clients,"
          f" {args.per_request} sentence(s) per request, {args.seconds:g} s per row after {args.warmup:g} s warm-up")
    results = []
    if args.url:
        try:
            httpx.get(f"{args.url}/health", timeout=5).raise_for_status()
        except httpx.HTTPError as e:
            sys.exit(f"error: {args.url}/health does not answer: {e}")
        for clients in client_counts:
            records = asyncio.run(load(args.url, sentences, clients, args.per_request, args.warmup, args.seconds))
            results.append(summarize(args.url, clients, records, args.seconds))
    else:
        try:
            reference = in_process_sentences_per_s(args.checkpoint, sentences)
        except (InputError, CheckpointError) as e:
            sys.exit(f"error: {e}")
        with tempfile.TemporaryDirectory() as tmp:
            for row, clients in itertools.product(rows, client_counts):
                try:
                    process, url = start_server(args.checkpoint, ROWS[row] + args.serve_options.split(), Path(tmp) / f"{row}.log")
                except RuntimeError as e:
                    sys.exit(f"error: {e}")
                rss = PeakRss(process.pid)
                try:
                    rss.start()
                    cpu_before = server_cpu_seconds(process.pid)
                    records = asyncio.run(load(url, sentences, clients, args.per_request, args.warmup, args.seconds))
                    cpu_seconds = server_cpu_seconds(process.pid) - cpu_before
                finally:
                    rss.stopped.set()
                    process.terminate()
                    process.wait(timeout=60)
                row_result = summarize(row, clients, records, args.seconds)
                served = sum(n for _, n, outcome in records if outcome == OK)
                results.append({
                    **row_result,
                    "share_of_in_process": row_result["sentences_per_s"] / reference,
                    # CPU time does not depend on what else the machine runs, as wall time does.
                    "server_cpu_ms_per_sentence": 1000 * cpu_seconds / served if served else float("nan"),
                    "peak_rss_mb": rss.peak_mb,
                    "load_average": os.getloadavg()[0],
                })
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"sentences": str(args.sentences)}, "rows": results},
                                        indent=2, default=str) + "\n")


def print_table(results: list[dict]) -> None:
    columns = [c for c in results[0] if c != "row"]
    width = max(len(r["row"]) for r in results)
    print(f"{'row':<{width}}  " + "  ".join(f"{c:>12}" for c in columns))
    for r in results:
        print(f"{r['row']:<{width}}  " + "  ".join(f"{r[c]:>12.3g}" if isinstance(r[c], float) else f"{r[c]:>12}" for c in columns))
    fewest, most = min(r["clients"] for r in results), max(r["clients"] for r in results)
    for name in dict.fromkeys(r["row"] for r in results):
        by_clients = {r["clients"]: r for r in results if r["row"] == name}
        if fewest != most and fewest in by_clients and most in by_clients:
            ratio = by_clients[most]["p99_ms"] / by_clients[fewest]["p99_ms"]
            print(f"{name}: p99 of accepted requests at {most} clients / at {fewest}: {ratio:.2f}x")
    by_name = {r["row"]: r for r in results if r["clients"] == fewest}
    for batched, unbatched in (("batched", "unbatched"), ("batched_2_workers", "unbatched_2_workers")):
        if batched in by_name and unbatched in by_name:
            ratio = by_name[batched]["sentences_per_s"] / by_name[unbatched]["sentences_per_s"]
            cpu = by_name[unbatched]["server_cpu_ms_per_sentence"] / by_name[batched]["server_cpu_ms_per_sentence"]
            print(f"{batched} / {unbatched}: {ratio:.2f}x the sentences/s, {cpu:.2f}x the sentences per CPU second")
    if "batched" in by_name and "batched_2_workers" in by_name:
        ratio = by_name["batched_2_workers"]["requests_per_s"] / by_name["batched"]["requests_per_s"]
        print(f"2 workers / 1 worker, batched: {ratio:.2f}x the requests/s")


if __name__ == "__main__":
    main()
