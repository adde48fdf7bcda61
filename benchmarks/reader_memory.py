"""Peak memory (RSS) of each reader of the project's inputs on its worst input (issue 44): a file of lines at the
line bound, and /dev/zero (one line without end), next to the real CoLA files.

    python benchmarks/reader_memory.py MODEL_DIR [LINES [ONLY]]   # MODEL_DIR: the laptop recipe's MiniLM; ONLY: cases
                                                                   # whose name holds this text

Each case is the real command in its own process (train.py for one step, inference.py, the teacher's unlabelled-file
reader); its peak RSS is the kernel's (os.wait4). Prints a Markdown table for benchmarks/README.md.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference import MAX_LINE_BYTES as INFERENCE_LINE_BYTES  # noqa: E402
from readers import MAX_LINE_BYTES  # noqa: E402

WORDS = "the boy sat on a bench and read his book while the dog slept".split()


def long_text(size: int) -> str:
    """Words up to size bytes (a line at the bound, whatever its fields around it take)."""
    text, words = "", iter(WORDS * (size // 3))
    while len(text) + 8 < size:
        text += next(words) + " "
    return text.strip()


def peak_rss_mb(command: list[str], cwd: Path, env: dict, stdin: bytes = b"") -> tuple[float, int, str, float]:
    """(peak RSS in MB, exit status, last stderr line, seconds) of one command."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            process.stdin.write(stdin)
            process.stdin.close()
        except BrokenPipeError:  # it refused the input before reading all of it
            pass
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = [line for line in err.read().decode(errors="replace").splitlines() if line.strip()]
    return usage.ru_maxrss / 1024, process.returncode, (lines[-1] if lines else "")[:110], time.monotonic() - started


def main() -> None:
    model, lines = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    only = sys.argv[3] if len(sys.argv) > 3 else ""
    with tempfile.TemporaryDirectory(prefix="reader-memory-") as folder:  # ~0.5 GB of files and caches
        rows = measure(Path(folder), model, lines, only)
    print("| reader | input | peak RSS (MB) | exit | seconds | last line |\n|---|---|---:|---:|---:|---|")
    for reader, name, rss, status, last, seconds in rows:
        print(f"| {reader} | {name} | {rss:,.0f} | {status} | {seconds:.0f} | {last.replace('|', '/')} |")


def measure(work: Path, model: str, lines: int, only: str) -> list[tuple]:
    """The table's rows: each case whose name holds `only`, and the real CoLA run always (its checkpoint is
    inference.py's)."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    dev = "".join(f"src\t{i % 2}\t\tThe boy sat on a bench {i}.\n" for i in range(32))
    text = long_text(MAX_LINE_BYTES - 64)
    many = f"{lines:,} lines of {len(text) // 1024} KiB"
    folders = {
        "CoLA TSV, the real train.tsv (7,541 lines)": REPO.parent / "shared/data/cola",
        f"CoLA TSV, {many}": {"train.tsv": "".join(f"src\t{i % 2}\t\t{text}\n" for i in range(lines)), "dev.tsv": dev},
        f"TSV table, {many}": {"train.tsv": "sentence\tlabel\n" + "".join(f"{text}\t{i % 2}\n" for i in range(lines)),
                               "dev.tsv": "sentence\tlabel\nThe boy sat.\t1\nBoy the sat.\t0\n"},
        f"CSV table, {many}": {"train.csv": "sentence,label\n" + "".join(f"{text},{i % 2}\n" for i in range(lines)),
                               "dev.csv": "sentence,label\nThe boy sat.,1\nBoy the sat.,0\n"},
        f"JSON Lines, {many}": {"train.jsonl": "".join(json.dumps({"sentence": text, "label": i % 2}) + "\n" for i in range(lines)),
                                "dev.jsonl": '{"sentence": "The boy sat.", "label": 1}\n{"sentence": "Boy the sat.", "label": 0}\n'},
        "CoLA TSV, /dev/zero as train.tsv": {"train.tsv": None, "dev.tsv": dev},
    }
    rows = []
    for number, (name, files) in enumerate(folders.items()):
        if number and only not in name:
            continue
        folder = files if isinstance(files, Path) else work / f"data-{number}"
        if not isinstance(files, Path):
            folder.mkdir()
            for file, content in files.items():
                if content is None:
                    (folder / file).symlink_to("/dev/zero")
                else:
                    (folder / file).write_text(content)
        run = work / f"run-{number}"
        run.mkdir()
        command = [sys.executable, str(REPO / "train.py"), "--model.model_name_or_path", model, "--data.data_dir", str(folder),
                   "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                   "--trainer.enable_progress_bar", "false"]
        rows.append(("train.py", name, *peak_rss_mb(command, run, env)))
    # The teacher's unlabelled file and inference.py's input lines (16 KiB bound), read as the commands read them.
    unlabelled = work / "unlabelled.txt"
    unlabelled.write_text(f"{text}\n" * lines)
    for name, path in ((many, unlabelled), ("/dev/zero", Path("/dev/zero"))):
        if only in name:
            command = [sys.executable, "-c", "import sys; from pathlib import Path; from distill import read_unlabelled;"
                       " print(sum(1 for _ in read_unlabelled(Path(sys.argv[1]), 1)))", str(path)]
            rows.append(("--data.unlabelled_file", name, *peak_rss_mb(command, REPO, env)))
    checkpoint = next((work / "run-0").glob("logs/cola/version_0/checkpoints/best-*.ckpt"))
    sentence = long_text(INFERENCE_LINE_BYTES - 64)
    inputs = {f"{lines:,} lines of {len(sentence) // 1024} KiB": f"{sentence}\n".encode() * lines, "one line of 64 MiB": b"x" * 2**26}
    inputs = {name: data for name, data in inputs.items() if only in name}
    if inputs:  # its first start exports the model to ONNX: not the reader's memory
        subprocess.run([sys.executable, str(REPO / "inference.py"), "--checkpoint", str(checkpoint), "Warm up."], env=env,
                       capture_output=True)
    for name, stdin in inputs.items():
        command = [sys.executable, str(REPO / "inference.py"), "--checkpoint", str(checkpoint), "-"]
        rows.append(("inference.py -", name, *peak_rss_mb(command, work, env, stdin)))
    return rows


if __name__ == "__main__":
    main()
