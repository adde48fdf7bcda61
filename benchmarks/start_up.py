"""Start-up cost of the integrity checks: what checking an ONNX export's digest and a checkpoint's zip CRC-32s
costs, against the alternatives, and the wall and CPU time of a first `inference.py` call and of `serve.py`
until /health answers, for this code and for other checkouts of it (`--code OLD NEW`), taken in turns. CPU
time (all threads) is what a busy machine's wall time hides: the work itself.

    python benchmarks/start_up.py --checkpoint best.ckpt --code /tmp/old-checkout . --repeats 7

The checkpoint's ONNX export is made first (by the last --code): every checkout then loads the same files.
"""

import argparse
import hashlib
import mmap
import resource
import statistics
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import httpx
import psutil
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.serve_load import free_port  # noqa: E402
from checkpoints import archive_damage  # noqa: E402
from export import export_intact  # noqa: E402

SENTENCE = "The boy is sitting on a bench."


def best_of(seconds: list[float]) -> str:
    return f"min {min(seconds):.3f} s, median {statistics.median(seconds):.3f} s"


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def on_memory_map(path: Path, digest) -> None:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        digest(data)


def checks(checkpoint: Path, repeats: int) -> None:
    """Each way to check a file's bytes, on the export and on the checkpoint (files in the page cache)."""
    export_path = checkpoint.with_suffix(".onnx")
    print(f"{export_path.name}: {export_path.stat().st_size / 1e6:.0f} MB; {checkpoint.name}: {checkpoint.stat().st_size / 1e6:.0f} MB")
    ways = {
        "export: sha256 (hashlib.file_digest)": lambda: hashlib.file_digest(open(export_path, "rb"), "sha256"),
        "export: blake2b (hashlib.file_digest)": lambda: hashlib.file_digest(open(export_path, "rb"), "blake2b"),
        "export: CRC-32 (zlib, memory map)": lambda: on_memory_map(export_path, zlib.crc32),
        "export: xxh3-64 (xxhash, memory map)": lambda: on_memory_map(export_path, xxhash.xxh3_64_hexdigest),
        "export: export_intact() (read, then xxh3-64, as inference.py)": lambda: export_intact(export_path.read_bytes()),
        "checkpoint: sha256 (hashlib.file_digest)": lambda: hashlib.file_digest(open(checkpoint, "rb"), "sha256"),
        "checkpoint: zipfile testzip() (reads and CRCs each member)": lambda: zipfile.ZipFile(checkpoint).testzip(),
        "checkpoint: archive_damage() (CRCs on a memory map, as load_checkpoint)": lambda: archive_damage(checkpoint),
    }
    for name, way in ways.items():
        print(f"  {name}: {best_of(timed(way, repeats))}")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def first_inference(code: Path, checkpoint: Path) -> tuple[float, float]:
    """Wall and CPU seconds of `python inference.py --checkpoint checkpoint SENTENCE`."""
    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    subprocess.run([sys.executable, str(code / "inference.py"), "--checkpoint", str(checkpoint), SENTENCE],
                   check=True, capture_output=True)
    return time.perf_counter() - started, children_cpu_seconds() - cpu_started


def serve_ready(code: Path, checkpoint: Path) -> tuple[float, float]:
    """Wall and CPU seconds from starting serve.py to its /health answering ready."""
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(code / "serve.py"), "--checkpoint", str(checkpoint), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["ready"]:
                    cpu = psutil.Process(process.pid).cpu_times()
                    return time.perf_counter() - started, cpu.user + cpu.system
            except httpx.TransportError:
                time.sleep(0.02)
        raise RuntimeError(f"{code / 'serve.py'} exited with status {process.returncode}")
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--code", type=Path, nargs="+", default=[Path(".")], help="checkouts to compare (their inference.py, serve.py)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    first_inference(args.code[-1], args.checkpoint)  # makes the export if it is missing: not timed
    checks(args.checkpoint, args.repeats)
    runs = {"inference.py first call": first_inference, "serve.py until /health": serve_ready}
    times = {(code, name): [] for code in args.code for name in runs}
    for _ in range(args.repeats):  # in turns, so that a change in the machine's load hits every checkout alike
        for code in args.code:
            for name, run in runs.items():
                times[code, name].append(run(code, args.checkpoint))
    for (code, name), pairs in times.items():
        wall, cpu = zip(*pairs)
        print(f"{code}: {name}: wall {best_of(list(wall))}; CPU {best_of(list(cpu))}")


if __name__ == "__main__":
    main()
