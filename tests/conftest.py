"""Offline fixtures: a tiny random-weight BERT with its own WordPiece vocab, and tiny CoLA TSV files."""

import atexit
import io
import json
import locale
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Tests never touch the network: fail fast instead of trying the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# One thread for torch's operators here and in every script a test runs: the models are tiny (a second thread costs
# more than it saves) and the suite runs one process per core (pytest-xdist), whose threads would only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: real services, images, sweeps and long training runs; left out of the fast tier between edits"
        " (python -m pytest -q -n auto -m 'not slow'), run by CI"
    )

WORDS = "the a boy girl dog cat sat ran saw is was on under bench mat park big small quickly".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
REPO = Path(__file__).resolve().parent.parent


def make_sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."


def write_tsv(path: Path, rows: list[tuple[int, str]]) -> None:
    path.write_text("".join(f"src\t{label}\t\t{sentence}\n" for label, sentence in rows), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS + ["."])}
    # transformers 5 ignores vocab_file= here (every token would become [UNK]); vocab= takes the dict.
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    ids = tokenizer("The dog sat on the mat.")["input_ids"]
    assert tokenizer.unk_token_id not in ids, "tiny vocab does not cover the test sentences"
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """48 training and 24 validation sentences; label 1 when the sentence mentions a dog (learnable)."""
    path = tmp_path_factory.mktemp("tiny-cola")
    rng = random.Random(0)
    for name, n in (("train.tsv", 48), ("dev.tsv", 24)):
        sentences = [make_sentence(rng) for _ in range(n)]
        write_tsv(path / name, [(int("dog" in s.lower()), s) for s in sentences])
    return path


ENVIRONMENT = dict(os.environ)  # the tests' own (offline), as collection left it; tests/prewarmed.py starts with it
# Variables that the interpreter, the C libraries or the libraries tests/prewarmed.py has loaded (torch, transformers,
# datasets, huggingface_hub) read once, when they start: a test that changes one (XDG_CACHE_HOME, say) gets a real
# subprocess. Any other change (Lightning's seed, a SLURM job, what a library sets for itself) is passed on to the child.
IMPORT_TIME_VARIABLE = re.compile(r"HF_|HUGGINGFACE_|TRANSFORMERS_|DATASETS_|TORCH_LOGS$|XDG_|HOME$|TMPDIR$|TEMP$|TMP$"
                                  r"|PYTHON|LD_|OMP_|MKL_|OPENBLAS_|CUDA_|LANG$|LC_")
_prewarmed: dict = {}
_prewarmed_lock = threading.Lock()


def pytest_collection_finish(session: pytest.Session) -> None:
    """The environment once every test module is imported (and with it every library the tests use)."""
    ENVIRONMENT.clear()
    ENVIRONMENT.update(os.environ)


def _prewarmed_process() -> subprocess.Popen:
    """This test process's tests/prewarmed.py (one per pytest-xdist worker), started on first use."""
    if "process" not in _prewarmed:
        process = subprocess.Popen([sys.executable, str(REPO / "tests" / "prewarmed.py")], env=ENVIRONMENT,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        _prewarmed["process"] = process
        atexit.register(process.kill)  # at the end of the session; its children are waited for by then
    return _prewarmed["process"]


def _decoded(path: Path) -> str:
    """A file's bytes as subprocess.run(text=True) gives a pipe's: the locale's encoding, newlines made \\n."""
    return io.TextIOWrapper(io.BytesIO(path.read_bytes()), encoding=locale.getpreferredencoding(False)).read()


def run_script(script: str, args: list[str], cwd: Path, stdin: str | None = None, timeout: float = 600,
               memory_limit_gb: int | None = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in cwd with its output captured, as subprocess.run(..., capture_output=True, text=True)
    returns it, run as a child forked from tests/prewarmed.py (the libraries' ~6 s of imports paid once).
    memory_limit_gb: the process's address space capped (RLIMIT_AS): an unbounded input ends in a MemoryError."""
    command = [sys.executable, str(REPO / script), *args]
    address_space = memory_limit_gb << 30 if memory_limit_gb else None
    changed = {k for k in os.environ.keys() | ENVIRONMENT.keys() if os.environ.get(k) != ENVIRONMENT.get(k)}
    if any(IMPORT_TIME_VARIABLE.match(name) for name in changed):
        limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))) if address_space else None
        return subprocess.run(command, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    with _prewarmed_lock, tempfile.TemporaryDirectory(prefix="prewarmed-") as folder:
        streams = {name: Path(folder) / name for name in ("stdin", "stdout", "stderr")}
        streams["stdin"].write_text(stdin or "")
        streams["stdout"].touch()  # the child opens them for writing, without creating them
        streams["stderr"].touch()
        process = _prewarmed_process()
        request = {"script": command[1], "args": args, "cwd": str(cwd), "timeout": timeout, "env": dict(os.environ),
                   "address_space": address_space,
                   **{name: str(path) for name, path in streams.items()}}
        try:
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(f"tests/prewarmed.py ended (exit {process.wait()}): see its output above")
        reply, stdout, stderr = json.loads(line), _decoded(streams["stdout"]), _decoded(streams["stderr"])
        if reply.get("timeout"):
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
        return subprocess.CompletedProcess(command, reply["returncode"], stdout, stderr)


def run_train(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as a user runs it, in workdir (so logs/ lands there), offline."""
    return run_script("train.py", ["--trainer.enable_progress_bar", "false", *args], workdir)


def tiny_train_args(model_dir: Path, data_dir: Path) -> list[str]:
    return [
        "--model.model_name_or_path", str(model_dir),
        "--data.data_dir", str(data_dir),
        "--data.batch_size", "8",
        "--model.learning_rate", "1e-3",
        "--trainer.log_every_n_steps", "1",
    ]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-epoch `python train.py` run on the tiny model: (its working directory, the process result)."""
    workdir = tmp_path_factory.mktemp("run")
    result = run_train(workdir, *tiny_train_args(tiny_model_dir, tiny_data_dir), "--trainer.max_epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.fixture(scope="session")
def input_sensitive_checkpoint(tiny_model_dir, tmp_path_factory):
    """The tiny BERT with large random weights, as a checkpoint of this project. The briefly trained one
    gives every sentence the same probability to 4 decimals, too flat to show whether int8 follows fp32."""
    labels = {0: "unacceptable", 1: "acceptable"}
    config = BertConfig.from_pretrained(tiny_model_dir, initializer_range=0.2, id2label=labels)
    torch.manual_seed(0)
    weights = BertForSequenceClassification(config).state_dict()
    path = tmp_path_factory.mktemp("sensitive") / "random.ckpt"
    torch.save({
        "hf_config": config.to_dict(),
        "tokenizer_files": {f.name: f.read_text() for f in tiny_model_dir.glob("tokenizer*.json")},
        "state_dict": {f"model.{name}": tensor for name, tensor in weights.items()},
    }, path)
    return path


def save_tiny_distilbert(model_dir: Path, tiny_model_dir: Path) -> Path:
    """A DistilBERT (its own classification head: pre_classifier, then classifier) with the tiny tokenizer."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=30, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertForSequenceClassification(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    return model_dir


def flip_bytes(path: Path, inside: bytes | None = None, at: int | None = None, count: int = 64) -> None:
    """Damage path as a bad disk or copy would: invert count bytes in the middle of its one copy of the bytes
    inside (a tensor's, say), or from offset at."""
    data = bytearray(path.read_bytes())
    if inside is not None:
        at = data.find(inside)
        assert at >= 0 and data.find(inside, at + 1) < 0, "the bytes to damage are not in the file exactly once"
        at += (len(inside) - count) // 2
    data[at : at + count] = bytes(b ^ 0xFF for b in data[at : at + count])
    path.write_bytes(bytes(data))


@pytest.fixture
def postgres_url(tmp_path) -> str:
    """A private PostgreSQL server on a free loopback port (Debian's `postgresql` package), stopped at the end."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not binaries:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is not installed: .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = binaries[-1].parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # root may not run the server
    data = Path(tempfile.mkdtemp(prefix="pg-"))
    if as_postgres:
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_postgres, bin_dir / "initdb", "-D", data / "db", "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_postgres, bin_dir / "pg_ctl", "-D", data / "db", "-o", options, "-l", data / "log", "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, bin_dir / "pg_ctl", "-D", data / "db", "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
