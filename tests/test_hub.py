"""The README's first command for real: `python train.py` downloading its model and CoLA from a Hub.

The Hub here is olah (PyPI: a Hugging Face mirror server) on loopback, in its offline mode: it serves
local git repositories of models and datasets, reached as users reach the Hub, through HF_ENDPOINT.
Between the clients and olah sits HubFront, a small proxy of this fixture's: it works around where
olah 0.5.4 answers otherwise than the Hub (below), and plays the Hub's faults. Nothing here goes
beyond 127.0.0.1.
"""

import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import pytest
import uvicorn
import yaml
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from benchmarks import serve_load
from conftest import REPO, make_sentence
from readers import read_glue_tsv

pytestmark = pytest.mark.slow  # real servers and several training runs: CI runs them, the fast tier does not

STAND_IN = "google-bert/bert-base-uncased"  # train.py's default model id, served as the tiny BERT (a stand-in)
OWN_ID = "mlops-one-tests/tiny-bert"  # the tiny BERT under an id of its own
DATASET = "nyu-mll/glue"  # data.py's HUB_DATASET, laid out as on the Hub: the cola config's parquet files
SHARED_COLA = REPO.parent / "shared" / "data" / "cola"
CUT_AFTER = 4096  # bytes of a file sent before HubFront.cut drops the connection
SIZES = {"train": 240, "validation": 80, "test": 60}  # sentences: a few hundred keep each run to seconds
CARD = """---
configs:
- config_name: cola
  data_files:
  - split: train
    path: cola/train-*
  - split: validation
    path: cola/validation-*
  - split: test
    path: cola/test-*
dataset_info:
- config_name: cola
  features:
  - name: sentence
    dtype: string
  - name: label
    dtype:
      class_label:
        names:
          '0': unacceptable
          '1': acceptable
  - name: idx
    dtype: int32
"""
# The sst2 and rte configurations, as the Hub's nyu-mll/glue card declares them: a single-sentence and a pair task.
OTHER_TASKS = {
    "sst2": (["sentence"], ["negative", "positive"]),
    "rte": (["sentence1", "sentence2"], ["entailment", "not_entailment"]),
}
for task, (texts, names) in OTHER_TASKS.items():
    CARD = CARD.replace("dataset_info:\n", "".join(
        f"- config_name: {task}\n  data_files:\n" + "".join(f"  - split: {s}\n    path: {task}/{s}-*\n" for s in SIZES)
    ) + "dataset_info:\n", 1)
    CARD += f"- config_name: {task}\n  features:\n" + "".join(f"  - name: {t}\n    dtype: string\n" for t in texts)
    CARD += "  - name: label\n    dtype:\n      class_label:\n        names:\n" + "".join(
        f"          '{i}': {n}\n" for i, n in enumerate(names)) + "  - name: idx\n    dtype: int32\n"
CARD += "---\n# GLUE (the cola, sst2 and rte configurations only: a stand-in for the tests)\n"


def commit_folder(folder: Path) -> None:
    """folder as a git repository with everything in it committed on branch main (what olah serves)."""
    git = ["git", "-C", str(folder), "-c", "user.name=tests", "-c", "user.email=tests@localhost"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "stand-in"]):
        subprocess.run([*git, *args], check=True, capture_output=True, timeout=60)


def cola_rows() -> dict[str, list[tuple[str, int]]]:
    """(sentence, label) per split: from ../shared/data/cola where this machine has it (CoLA's own
    sentences), else CoLA-like ones of the tiny vocabulary (label 1 when a dog is named). The test split
    has no labels on the Hub: -1."""
    if (SHARED_COLA / "train.tsv").is_file():
        rows = [(row["sentence"], row["label"]) for name in ("train.tsv", "dev.tsv") for row in read_glue_tsv(SHARED_COLA / name)]
        random.Random(0).shuffle(rows)
    else:
        generated = random.Random(0)
        rows = [(s, int("dog" in s.lower())) for s in (make_sentence(generated) for _ in range(sum(SIZES.values())))]
    splits, start = {}, 0
    for split, size in SIZES.items():
        splits[split] = [(s, -1 if split == "test" else label) for s, label in rows[start : start + size]]
        start += size
    return splits


def write_glue(folder: Path) -> dict[str, list[tuple[str, int]]]:
    import datasets

    features = datasets.Features({
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["unacceptable", "acceptable"]),
        "idx": datasets.Value("int32"),
    })
    splits = cola_rows()
    (folder / "cola").mkdir(parents=True)
    for split, rows in splits.items():
        columns = {"sentence": [s for s, _ in rows], "label": [label for _, label in rows], "idx": list(range(len(rows)))}
        datasets.Dataset.from_dict(columns, features=features).to_parquet(folder / "cola" / f"{split}-00000-of-00001.parquet")
    rng = random.Random(1)
    for task, (texts, names) in OTHER_TASKS.items():  # label 1 when the first text names a dog
        features = datasets.Features({**{t: datasets.Value("string") for t in texts},
                                      "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")})
        (folder / task).mkdir()
        for split, size in SIZES.items():
            rows = [[make_sentence(rng) for _ in texts] for _ in range(size)]
            columns = {t: [row[i] for row in rows] for i, t in enumerate(texts)}
            columns["label"] = [-1 if split == "test" else int("dog" in row[0].lower()) for row in rows]
            columns["idx"] = list(range(size))
            datasets.Dataset.from_dict(columns, features=features).to_parquet(folder / task / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text(CARD, encoding="utf-8")
    return splits


class HubFront:
    """An ASGI proxy in front of olah. olah 0.5.4 answers 401 "Repository not found" for a file or folder
    that an existing repository lacks, and for /api/models/ORG/NAME without a revision, where the Hub
    answers 404 EntryNotFound; transformers probes optional files (added_tokens.json, chat templates...)
    and takes a 401 for a missing repository. Such answers about the repositories served become the Hub's
    404. The faults: `refuse` answers a repository's every request with the Hub's status and error code;
    `cut` ends the body of files of that name halfway, then drops the connection."""

    def __init__(self, olah: str, repositories: list[str]) -> None:
        self.olah, self.repositories = olah, repositories
        self.refuse: dict[str, tuple[int, str]] = {}
        self.cut: Optional[str] = None
        self.client = httpx.AsyncClient(base_url=olah, timeout=60)

    def repository(self, path: str) -> Optional[str]:
        return next((r for r in [*self.repositories, *self.refuse] if f"/{r}/" in f"{path}/"), None)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        repository = self.repository(request.url.path)
        if repository in self.refuse:
            status, code = self.refuse[repository]
            await Response(status_code=status, headers={"x-error-code": code, "x-error-message": code})(scope, receive, send)
            return
        headers = [(k, v) for k, v in request.headers.items() if k not in ("host", "content-length")]
        upstream = await self.client.send(
            self.client.build_request(request.method, request.url.path, params=request.url.query or None,
                                      headers=headers, content=await request.body()),
            stream=True,
        )
        if upstream.status_code == 401 and repository in self.repositories:
            await upstream.aclose()
            answer = Response(status_code=404, headers={"x-error-code": "EntryNotFound", "x-error-message": "Entry not found"})
        else:
            answer = StreamingResponse(self.body(upstream, request.url.path), status_code=upstream.status_code,
                                       headers=dict(upstream.headers))
        await answer(scope, receive, send)

    async def body(self, upstream: httpx.Response, path: str):
        sent = 0
        try:
            async for chunk in upstream.aiter_raw():
                if self.cut and path.endswith("/" + self.cut) and upstream.status_code < 300 and sent + len(chunk) > CUT_AFTER:
                    yield chunk[: CUT_AFTER - sent]
                    raise ConnectionAbortedError("HubFront drops the connection (a fault the test plays)")
                sent += len(chunk)
                yield chunk
        finally:
            await upstream.aclose()


class LoopbackHub:
    """olah serving the mirrors folder, HubFront before it; url is what HF_ENDPOINT names."""

    def __init__(self, mirrors: Path, work: Path, repositories: list[str]) -> None:
        self.mirrors, self.work, self.repositories = mirrors, work, repositories
        self.olah_port, self.port = serve_load.free_port(), serve_load.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.olah: Optional[subprocess.Popen] = None
        self.front: Optional[HubFront] = None
        self.server: Optional[uvicorn.Server] = None
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        config = self.work / "olah.toml"
        # offline: the local repositories only, never huggingface.co; the proxy and cache rules must allow
        # every repository (`*/*`), or olah answers 401 for all of them.
        config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self.olah_port}\nrepos-path = "{self.work / "repos"}"\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            '[accessibility]\noffline = true\n'
            'proxy = [{ repo = "*", allow = true }, { repo = "*/*", allow = true }]\n'
            'cache = [{ repo = "*", allow = true }, { repo = "*/*", allow = true }]\n'
        )
        log = open(self.work / "olah.log", "ab")
        self.olah = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(self.work / "logs")],
                                     cwd=self.work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.front = HubFront(f"http://127.0.0.1:{self.olah_port}", self.repositories)
        self.server = uvicorn.Server(uvicorn.Config(self.front, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/models/{self.repositories[0]}/revision/main", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.olah.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the loopback Hub did not start:\n{(self.work / 'olah.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.server:
            self.server.should_exit = True
            self.thread.join(timeout=10)
        if self.olah and self.olah.poll() is None:
            os.killpg(self.olah.pid, signal.SIGTERM)
            try:
                self.olah.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.olah.pid, signal.SIGKILL)
                self.olah.wait()
        self.server = self.olah = None


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory, tiny_model_dir) -> tuple[Path, dict]:
    """The repositories olah serves (models/ORG/NAME, datasets/ORG/NAME), and the CoLA splits in them."""
    root = tmp_path_factory.mktemp("mirrors")
    for model in (STAND_IN, OWN_ID):
        shutil.copytree(tiny_model_dir, root / "models" / model)
        commit_folder(root / "models" / model)
    splits = write_glue(root / "datasets" / DATASET)
    commit_folder(root / "datasets" / DATASET)
    return root, splits


@pytest.fixture
def hub(mirrors, tmp_path):
    """The loopback Hub, started for one test and stopped after it (a test may stop it earlier)."""
    loopback = LoopbackHub(mirrors[0], tmp_path, [STAND_IN, OWN_ID, DATASET])
    loopback.start()
    yield loopback
    loopback.stop()


def user_env(endpoint: str, hf_home: Path, **extra: str) -> dict:
    """A user's environment reaching the Hub at endpoint with an empty cache: the suite's offline switches
    (conftest) removed, no proxy (the Hub is on loopback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), **extra}


def run(command: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def readme_first_command() -> list[str]:
    """The Quick start's training command, as the README writes it."""
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    command = next(line for line in block.group(1).splitlines() if "train.py" in line)
    assert command == "python train.py", command  # the test runs what a user types, not a variant
    return shlex.split(command)[1:]


# One of the 15 slowest (~40 s): the README's first command through a Hub mirror, downloads and all, then from its cache
# (real processes: HF_ENDPOINT is read at import, so tests/prewarmed.py cannot run them).
def test_the_readme_first_command_trains_from_the_hub_then_from_its_cache(hub, mirrors, tmp_path):
    _, splits = mirrors
    work, hf_home = tmp_path / "work", tmp_path / "hf_home"
    work.mkdir()
    env = user_env(hub.url, hf_home)
    train = run([str(REPO / readme_first_command()[0])], work, env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = work / "logs/cola/version_0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = work / metrics["best_model_path"]
    assert best.is_file() and best.with_suffix(".onnx").is_file()  # the export the README says a run leaves
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["model_name_or_path"] == STAND_IN

    predicted = run([str(REPO / "inference.py"), "The boy is sitting on a bench."], work, env)
    assert predicted.returncode == 0 and predicted.stdout.count("\n") == 1, predicted.stderr[-2000:]

    leaderboard = run([str(REPO / "inference.py"), "--glue_test"], work, env)  # the Hub's test split
    assert leaderboard.returncode == 0, leaderboard.stderr[-2000:]
    lines = leaderboard.stdout.splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + len(splits["test"])
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(len(splits["test"]))]

    process, url = serve_load.start_server(None, [], tmp_path / "serve.log", cwd=work)  # the export: no Hub
    try:
        answer = httpx.post(f"{url}/predict", json={"sentences": ["The boy is sitting on a bench."]}, timeout=60)
        assert answer.status_code == 200 and answer.json()[0]["label"] in ("acceptable", "unacceptable")
    finally:
        process.kill()

    hub.stop()  # from the cache alone, as on a machine that lost the network
    again = run([str(REPO / "train.py")], work, {**env, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (work / "logs/cola/version_1/metrics.json").is_file()


@pytest.mark.parametrize("task", list(OTHER_TASKS))
# One or two of the 15 slowest (~20-25 s each): each task downloaded from the mirror, trained, and its test split answered.
def test_other_glue_tasks_train_from_the_hub_and_answer_glues_test_split(hub, task, tmp_path):
    texts, names = OTHER_TASKS[task]
    env = user_env(hub.url, tmp_path / "hf_home")
    train = run([str(REPO / "train.py"), "--data.task", task, *ONE_EPOCH], tmp_path, env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = json.loads((tmp_path / f"logs/{task}/version_0/metrics.json").read_text())
    assert metrics["monitor"] == "val_accuracy" and "val_accuracy=" in metrics["best_model_path"]
    given = "The dog sat.\tA cat ran." if len(texts) == 2 else "The dog sat."
    predicted = run([str(REPO / "inference.py"), "--checkpoint", f"logs/{task}", "--json", given], tmp_path, env)
    assert predicted.returncode == 0 and json.loads(predicted.stdout)["label"] in names, predicted.stderr[-2000:]
    leaderboard = run([str(REPO / "inference.py"), "--checkpoint", f"logs/{task}", "--glue_test"], tmp_path, env)
    assert leaderboard.returncode == 0, leaderboard.stderr[-2000:]
    lines = leaderboard.stdout.splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + SIZES["test"]
    # GLUE's server reads SST-2's labels as numbers, RTE's as words.
    assert {line.split("\t")[1] for line in lines[1:]} <= ({"0", "1"} if task == "sst2" else set(names))
    assert {"sst2": "SST-2.tsv", "rte": "RTE.tsv"}[task] in leaderboard.stderr


def fails_in_one_line(result: subprocess.CompletedProcess, cwd: Path) -> str:
    """The one `error:` line a failed command ended with (huggingface_hub's own retry notes may come before
    it); nothing half-written: no run folder."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (cwd / "logs" / "cola").exists() or not any((cwd / "logs" / "cola").iterdir())
    return errors[0]


ONE_EPOCH = ["--trainer.max_epochs", "1"]


def test_an_unreachable_hub_is_one_line_soon_and_the_next_run_is_clean(hub, tmp_path):
    hf_home, started = tmp_path / "hf_home", time.monotonic()
    nowhere = f"http://127.0.0.1:{serve_load.free_port()}"  # nothing listens there
    line = fails_in_one_line(run([str(REPO / "train.py"), *ONE_EPOCH], tmp_path, user_env(nowhere, hf_home)), tmp_path)
    assert time.monotonic() - started < 30  # ~8 s here: one probe, no retries with backoff
    # The data loads first (its labels make the model's head): the dataset is what could not be downloaded.
    assert f"'{DATASET}'" in line and nowhere in line and "unreachable" in line and "--model.model_name_or_path DIR" in line
    again = run([str(REPO / "train.py"), *ONE_EPOCH], tmp_path, user_env(hub.url, hf_home))  # the Hub back, same cache
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.parametrize("repository, refusal, says", [
    ("mlops-one-tests/missing", None, "check the id"),  # olah's own answer: 401 RepoNotFound, as the Hub's
    (OWN_ID, (403, "GatedRepo"), "is gated"),  # logged in, its conditions not accepted
], ids=["missing", "gated"])
def test_a_missing_or_gated_repository_is_one_line(hub, tmp_path, repository, refusal, says):
    if refusal:
        hub.front.refuse[repository] = refusal
    args = [str(REPO / "train.py"), "--model.model_name_or_path", repository, *ONE_EPOCH]
    line = fails_in_one_line(run(args, tmp_path, user_env(hub.url, tmp_path / "hf_home")), tmp_path)
    assert f"'{repository}'" in line and hub.url in line and says in line and "hf auth login" in line


# One of the 15 slowest (~30 s): a download cut by the mirror, then a run that downloads and trains.
def test_a_download_cut_off_is_one_line_and_the_next_run_downloads_it_whole(hub, mirrors, tmp_path):
    hf_home, env = tmp_path / "hf_home", user_env(hub.url, tmp_path / "hf_home")
    args = [str(REPO / "train.py"), "--model.model_name_or_path", OWN_ID, *ONE_EPOCH]
    hub.front.cut = "model.safetensors"
    line = fails_in_one_line(run(args, tmp_path, env), tmp_path)
    assert f"'{OWN_ID}'" in line and hub.url in line and "broke off" in line and "again" in line
    assert not [p for p in hf_home.rglob("*") if "safetensors" in p.name or p.name.endswith(".incomplete")]
    hub.front.cut = None
    again = run(args, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    weights = [p for p in hf_home.rglob("model.safetensors") if OWN_ID.replace("/", "--") in str(p)]
    original = hashlib.sha256((mirrors[0] / "models" / OWN_ID / "model.safetensors").read_bytes()).hexdigest()
    assert weights and hashlib.sha256(weights[0].read_bytes()).hexdigest() == original  # whole, not truncated
    assert not list(hf_home.rglob("*.incomplete"))
