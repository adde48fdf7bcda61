"""Serving without PyTorch: an ONNX export as the model, a venv with only requirements-serve.txt, and the
image (Dockerfile) built and run with podman, each answering /predict exactly as Predictor does."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from benchmarks import serve_load
from checkpoints import CheckpointError
from conftest import REPO
from inference import Predictor, InputError

pytestmark = pytest.mark.slow  # podman image builds and fresh venvs: the fast tier leaves them to CI

SENTENCES = ["The dog sat on the mat.", "Mat the on sat dog the.", "A big cat ran quickly under the bench.", ""]
HEAVY = ("torch", "lightning", "pytorch_lightning", "transformers")
# podman as this machine and CI allow it: setting RLIMIT_NPROC is forbidden, and crun refuses their cgroups.
CONTAINERS_CONF = '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n'


@pytest.fixture(scope="module")
def best_checkpoint(trained) -> Path:
    workdir, _ = trained
    return workdir / json.loads((workdir / "logs/cola/version_0/metrics.json").read_text())["best_model_path"]


@pytest.fixture(scope="module")
def bundle(best_checkpoint, tmp_path_factory) -> Path:
    """A folder holding the checkpoint's ONNX export alone (train.py made it), as a user copies it to deploy."""
    folder = tmp_path_factory.mktemp("model")
    shutil.copy(best_checkpoint.with_suffix(".onnx"), folder)
    folder.chmod(0o755)  # readable by the image's user when mounted (pytest's folders are the owner's alone)
    return folder


@pytest.fixture(scope="module")
def expected(best_checkpoint) -> list[dict]:
    return Predictor(best_checkpoint).predict(SENTENCES)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """requirements-serve.txt's wheels, downloaded here (pip in the image build cannot verify this network's TLS)."""
    folder = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "download", "-q", "-r", str(REPO / "requirements-serve.txt"), "-d", str(folder)]
    result = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


def test_an_export_or_its_folder_predicts_as_the_checkpoint(best_checkpoint, bundle, expected, trained, tiny_model_dir):
    for model in (bundle, next(bundle.glob("*.onnx"))):
        predictor = Predictor(model)
        assert predictor.predict(SENTENCES) == expected
        assert predictor.base_model == str(tiny_model_dir)  # the export names it: an image has no hparams.yaml


def test_a_bad_export_is_one_line(bundle, tmp_path):
    with pytest.raises(InputError, match="--backend torch runs a checkpoint"):
        Predictor(bundle, backend="torch")
    with pytest.raises(CheckpointError, match="0 exports for --backend onnx-int8 here"):
        Predictor(bundle, backend="onnx-int8")
    (tmp_path / "two").mkdir()
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(next(bundle.glob("*.onnx")), tmp_path / "two" / name)
    with pytest.raises(CheckpointError, match=r"2 exports for --backend onnx here \(a.onnx, b.onnx\)"):
        Predictor(tmp_path / "two")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="broken.onnx: not a loadable ONNX model"):
        Predictor(tmp_path / "broken.onnx")
    with pytest.raises(CheckpointError, match="missing.onnx: exported model not found"):
        Predictor(tmp_path / "missing.onnx")


def test_an_onnx_file_without_this_projects_metadata_is_one_line(tmp_path):
    import onnx

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(CheckpointError, match="other.onnx: not an export of this project"):
        Predictor(tmp_path / "other.onnx")


def heavy_modules_after_serving(python: str, model: Path) -> list[str]:
    """The heavy libraries imported by `import serve` and a prediction on model, in a fresh python."""
    code = (
        "import json, sys, serve, inference; inference.Predictor(sys.argv[1]).predict(['The dog sat.']);"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    )
    result = subprocess.run([python, "-c", code, str(model)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_serving_an_export_imports_no_torch_even_where_it_is_installed(bundle):
    assert heavy_modules_after_serving(sys.executable, bundle) == []


def test_a_venv_with_only_the_serving_requirements_serves_as_colapredictor(bundle, wheels, expected, best_checkpoint, tmp_path):
    venv = tmp_path / "lean"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
               "-r", str(REPO / "requirements-serve.txt")]
    subprocess.run(install, check=True, timeout=600)
    installed = subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
    names = {package["name"].lower() for package in json.loads(installed.stdout)}
    assert "onnxruntime" in names and not names & {"torch", "lightning", "pytorch-lightning", "transformers", "onnx"}
    assert heavy_modules_after_serving(python, bundle) == []
    try:
        process, url = serve_load.start_server(str(bundle), [], tmp_path / "serve.log", python=python)
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        response = httpx.post(f"{url}/predict", json={"sentences": SENTENCES}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json() == expected
    finally:
        process.kill()
    # Without PyTorch a checkpoint, or a folder without an export, is one line naming what to give instead.
    for given in (best_checkpoint, best_checkpoint.parent.parent, tmp_path):
        for command in (["serve.py", "--checkpoint", str(given)], ["inference.py", "--checkpoint", str(given), "Hi."]):
            result = subprocess.run([python, *command], cwd=REPO, capture_output=True, text=True, timeout=120)
            assert result.returncode != 0 and result.stdout == "", result.stdout
            assert len(result.stderr.splitlines()) == 1 and "without PyTorch only an export" in result.stderr, result.stderr


def lines_of_a_container_given(image: tuple[str, dict], folder: Path) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of the image's own command with folder mounted as /model."""
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)
    # --no-healthcheck: podman would say on stderr that it cannot schedule the HEALTHCHECK without systemd.
    result = podman(image, "run", "--rm", "--no-healthcheck", "-v", f"{folder}:/model:ro", image[0])
    return result.returncode, result.stderr.splitlines()


# One of the 15 slowest on a fresh machine (~100 s, CI 2026-12-07; seconds where podman has the layers): its `image`
# fixture builds the image with podman once, for every test here.
def test_the_image_given_a_checkpoint_or_nothing_says_in_one_line_it_needs_an_export(image, best_checkpoint, tmp_path):
    (tmp_path / "ckpt").mkdir()
    shutil.copy(best_checkpoint, tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "ckpt", tmp_path / "empty"):
        status, lines = lines_of_a_container_given(image, folder)
        assert status != 0 and len(lines) == 1, lines
        assert lines[0].startswith("error: /model: no ONNX export") and "best-*.onnx" in lines[0], lines


# The image: built from nothing (a debootstrapped base kept in podman's store after the first run) and run.


def podman_env(tmp_path: Path) -> dict:
    conf = tmp_path / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


@pytest.fixture(scope="module")
def image(bundle, wheels, tmp_path_factory) -> tuple[str, dict]:
    """The image built from this checkout with the bundle copied in: (its name, podman's environment)."""
    if shutil.which("podman") is None:
        message = "podman is not installed (apt-get install podman runc debootstrap)"
        if os.environ.get("CI") == "true":  # CI installs it: missing there is a failure, not a pass
            pytest.fail(message)
        pytest.skip(message)
    env = podman_env(tmp_path_factory.mktemp("podman"))
    subprocess.run([str(REPO / ".ci/bookworm-slim")], env=env, check=True, timeout=900)
    context = tmp_path_factory.mktemp("context")
    for path in [*REPO.glob("*.py"), *REPO.glob("*.html"), *REPO.glob("*.txt"), REPO / "Dockerfile", REPO / ".dockerignore"]:
        shutil.copy(path, context)
    shutil.copytree(bundle, context / "model")
    shutil.copytree(wheels, context / "wheels")
    name = "localhost/cola-serve:test"
    # docker format: OCI images carry no HEALTHCHECK.
    build = subprocess.run(["podman", "build", "-q", "--format", "docker", "-t", name, str(context)], env=env,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    return name, env  # kept: its layers are the next build's cache


def run_container(image: tuple[str, dict], *args: str) -> tuple[str, str]:
    """A detached container of image (podman run ARGS) on a free loopback port: (its id, its URL), once ready."""
    name, env = image
    port = serve_load.free_port()
    run = ["podman", "run", "-d", "-p", f"127.0.0.1:{port}:8000", *args]
    started = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    container, url = started.stdout.strip(), f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).json()["ready"]:
                return container, url
        except (httpx.TransportError, ValueError):
            time.sleep(0.2)
    logs = subprocess.run(["podman", "logs", container], env=env, capture_output=True, text=True)
    pytest.fail(f"the container did not start:\n{(logs.stdout + logs.stderr)[-2000:]}")


def podman(image: tuple[str, dict], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=image[1], capture_output=True, text=True, timeout=120)


def test_the_image_serves_as_colapredictor_and_stops_on_sigterm(image, expected, tiny_model_dir):
    name, _ = image
    container, url = run_container(image, name)
    try:
        assert httpx.post(f"{url}/predict", json={"sentences": SENTENCES}, timeout=60).json() == expected
        # The export's base model was a folder on the training machine: /health names its last two parts only.
        assert httpx.get(f"{url}/health").json()["model"] == f"{tiny_model_dir.parent.name}/{tiny_model_dir.name}"
        assert podman(image, "healthcheck", "run", container).returncode == 0  # the image's HEALTHCHECK passes
        user = podman(image, "exec", container, "id", "-u").stdout.strip()
        assert user != "0", "the server runs as root"
        assert podman(image, "stop", "--time", "30", container).returncode == 0  # SIGTERM, SIGKILL after 30 s
        state = json.loads(podman(image, "inspect", container).stdout)[0]["State"]
        assert state["Status"] == "exited" and state["ExitCode"] in (0, 128 + signal.SIGTERM)
        assert "Finished server process" in podman(image, "logs", container).stderr
    finally:
        podman(image, "rm", "-f", container)


def test_a_mounted_model_is_served_and_sigterm_finishes_the_request_in_flight(image, bundle, expected):
    name, _ = image
    # The batcher holds a request for 5 s (it waits for more sentences): SIGTERM arrives meanwhile.
    container, url = run_container(
        image, "-v", f"{bundle}:/mounted:ro", name,
        "python3", "serve.py", "--checkpoint", "/mounted", "--host", "0.0.0.0", "--port", "8000", "--max_wait_ms", "5000",
    )
    try:
        responses = []
        request = threading.Thread(
            target=lambda: responses.append(httpx.post(f"{url}/predict", json={"sentences": SENTENCES}, timeout=60))
        )
        request.start()
        time.sleep(2)
        assert podman(image, "kill", "--signal", "TERM", container).returncode == 0
        request.join(timeout=60)
        assert podman(image, "wait", container).stdout.strip() in ("0", str(128 + signal.SIGTERM))
        assert responses and responses[0].status_code == 200 and responses[0].json() == expected
    finally:
        podman(image, "rm", "-f", container)


def test_sigint_to_the_containers_pid_1_stops_it_at_once_with_130(image):
    """Ctrl-C on `docker run -it`: SIGINT to PID 1, which the kernel drops for a process without a handler (a
    container that would not stop). Held: uvicorn handles it; the container exits with 130 (or 0) within seconds.
    One of tests/test_adversarial.py's surfaces (the container), here beside the image's fixture."""
    name, _ = image
    container, _ = run_container(image, name)
    try:
        started = time.monotonic()
        assert podman(image, "kill", "--signal", "INT", container).returncode == 0
        status = podman(image, "wait", container).stdout.strip()
        assert status in ("0", str(128 + signal.SIGINT)) and time.monotonic() - started < 10, status
    finally:
        podman(image, "rm", "-f", container)
