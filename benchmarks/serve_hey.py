"""serve.py under load from hey, a load generator in Go (Debian: `apt-get install hey`), not Python threads.

    python benchmarks/serve_hey.py --checkpoint logs/cola/version_0/checkpoints/best-....ckpt \\
        --connections 32,256,1024 --seconds 10

Each row starts `python serve.py` (with --serve_options) on a free loopback port and, once /health answers,
runs `hey -z SECONDS -c N` for 2 s (not counted), then for SECONDS: N connections, each POSTing one
sentence (a typical one of CoLA's length) as soon as the last answer came (closed loop), or, with
--rate R, at most R requests/s over all of them (hey's -q per connection; R above the capacity offers
overload at a set rate). hey's CSV has each request's status and latency, so the percentiles are of the
accepted (200) requests alone. Per row: goodput (200s/s), p50/p99 of the 200s, the refused (503) share,
any other status (0: no answer, hey's timeout of 20 s or a dropped connection), the server's CPU ms per
served sentence and peak RSS (all its processes), hey's own CPU seconds (it shares the machine's cores)
and the load average before the row.
"""

import argparse
import collections
import csv
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.serve_load import PeakRss, server_cpu_seconds, start_server  # noqa: E402

SENTENCE = "The more you read, the more books you want to read."  # 14 tokens: CoLA's median is 11-12
WARMUP_S = 2


def hey(url: str, connections: int, seconds: float, rate: float) -> tuple[list[tuple[float, int]], float]:
    """(latency s, status) of every request of `hey -z`, and hey's CPU seconds."""
    command = ["hey", "-z", f"{seconds}s", "-c", str(connections), "-m", "POST", "-T", "application/json",
               "-d", f'{{"sentences": ["{SENTENCE}"]}}', "-o", "csv", f"{url}/predict"]
    if rate:
        command[5:5] = ["-q", f"{rate / connections:.3f}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"error: hey failed: {result.stderr.strip()[-500:]}")
    rows = csv.DictReader(io.StringIO(result.stdout))
    requests = [(float(row["response-time"]), int(row["status-code"])) for row in rows]
    return requests, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def summarize(connections: int, requests: list, seconds: float, cpu_s: float, rss_mb: float, hey_cpu_s: float, load: float) -> dict:
    statuses = collections.Counter(status for _, status in requests)
    accepted = sorted(latency for latency, status in requests if status == 200)
    quantile = lambda q: 1000 * accepted[min(len(accepted) - 1, int(q * len(accepted)))] if accepted else float("nan")  # noqa: E731
    return {
        "connections": connections, "ok_per_s": len(accepted) / seconds, "p50_ms": quantile(0.5), "p99_ms": quantile(0.99),
        "refused_share": statuses[503] / max(1, len(requests)),
        "other": {code: n for code, n in statuses.items() if code not in (200, 503)},
        "cpu_ms_per_sentence": 1000 * cpu_s / max(1, len(accepted)), "rss_mb": rss_mb, "hey_cpu_s": hey_cpu_s, "load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="what serve.py serves: a .ckpt, run folder or export")
    parser.add_argument("--connections", default="32,256,1024", help="comma-separated: one row each")
    parser.add_argument("--seconds", type=float, default=10.0, help="counted seconds per row")
    parser.add_argument("--rate", type=float, default=0.0, help="offered requests/s over all connections (0: closed loop)")
    parser.add_argument("--serve_options", default="", help="more serve.py options, e.g. '--max_queue 32'")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("error: hey is not installed (Debian: apt-get install hey)")
    connections = [int(n) for n in args.connections.split(",")]
    print(f"{os.cpu_count()} CPUs; serve.py {args.serve_options or '(defaults)'}; {args.seconds:g} s per row"
          f"{f', offered {args.rate:g} requests/s' if args.rate else ', closed loop'}; one sentence a request")
    print("| connections | 200/s | p50 ms | p99 ms | refused | other | server CPU ms/sentence | peak RSS MB | hey CPU s | load |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for count in connections:
            load = os.getloadavg()[0]
            process, url = start_server(args.checkpoint, args.serve_options.split(), Path(tmp) / f"{count}.log")
            rss = PeakRss(process.pid)
            try:
                rss.start()
                hey(url, count, WARMUP_S, args.rate)
                cpu_before = server_cpu_seconds(process.pid)
                requests, hey_cpu_s = hey(url, count, args.seconds, args.rate)
                cpu_s = server_cpu_seconds(process.pid) - cpu_before
                alive = process.poll() is None
            finally:
                rss.stopped.set()
                process.terminate()
                process.wait(timeout=60)
            row = summarize(count, requests, args.seconds, cpu_s, rss.peak_mb, hey_cpu_s, load)
            other = ", ".join(f"{n} x {code}" for code, n in sorted(row["other"].items())) or "none"
            print(f"| {count} | {row['ok_per_s']:.0f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['refused_share']:.1%}"
                  f" | {other}{'' if alive else ' (server died)'} | {row['cpu_ms_per_sentence']:.2f} | {row['rss_mb']:.0f}"
                  f" | {row['hey_cpu_s']:.1f} | {row['load']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
