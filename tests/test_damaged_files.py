"""Damaged files: an ONNX export or a checkpoint whose bytes changed after it was written (a bad disk, a broken
copy), cut short, empty, or no such file at all. Each is rebuilt or refused in one line, never served."""

import os
import shutil
import zipfile
from pathlib import Path

import onnx
import pytest
import torch

import export
from checkpoints import CheckpointError
from conftest import flip_bytes
from inference import Predictor
from test_inference import SENTENCES, one_line_error, run_inference


def probabilities(results: list[dict]) -> list[float]:
    return [r["probabilities"]["acceptable"] for r in results]


@pytest.fixture(scope="module")
def exported(input_sensitive_checkpoint, tmp_path_factory) -> Path:
    """The input-sensitive checkpoint (damaged weights change its answers) and its two exports, built once."""
    path = tmp_path_factory.mktemp("exported") / "model.ckpt"
    shutil.copy(input_sensitive_checkpoint, path)
    Predictor(path, "onnx-int8")
    return path


@pytest.fixture
def checkpoint(exported, tmp_path) -> Path:
    """A copy of exported's folder, alone in a folder: its exports match by the checkpoint's sha256."""
    for path in exported.parent.iterdir():
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / exported.name


def initializer_bytes(onnx_path: Path, name_part: str) -> bytes:
    """The stored bytes of the export's first weight whose name contains name_part."""
    return next(t.raw_data for t in onnx.load(onnx_path).graph.initializer if name_part in t.name and t.raw_data)


def damage_export(path: Path, how: str) -> None:
    if how == "classifier-weights":  # what the probe did: the default backend then said "unacceptable 1.000" to all
        weights = initializer_bytes(path, "classifier.weight")
        flip_bytes(path, inside=weights, count=min(64, len(weights) // 2))
    elif how == "tokenizer-metadata":
        tokenizer = onnx.load(path).metadata_props
        text = next(entry.value for entry in tokenizer if entry.key == "tokenizer").encode()
        flip_bytes(path, inside=text, count=8)
    elif how == "header":
        flip_bytes(path, at=0, count=16)
    elif how == "digest":
        flip_bytes(path, at=path.stat().st_size - 4, count=4)
    elif how == "cut-short":
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["classifier-weights", "tokenizer-metadata", "header", "digest", "cut-short", "empty"])
def test_a_damaged_export_is_exported_again(checkpoint, how, capfd):
    """On the int8 export, which is rebuilt in a second (the fp32 one takes ~15 s: the command line's test)."""
    expected = probabilities(Predictor(checkpoint, "onnx-int8").predict(SENTENCES))
    export_path = checkpoint.with_suffix(".int8.onnx")
    damage_export(export_path, how)
    capfd.readouterr()
    assert probabilities(Predictor(checkpoint, "onnx-int8").predict(SENTENCES)) == pytest.approx(expected, abs=1e-6)
    rebuilt = f"again: the cached {export_path} is {export.EXPORT_DAMAGED}..."
    assert [line for line in capfd.readouterr().err.splitlines() if line.endswith(rebuilt)], "rebuilt without a word"
    assert {p.name for p in checkpoint.parent.iterdir()} == {"model.ckpt", "model.onnx", "model.int8.onnx"}  # nothing left beside


def test_the_command_line_reexports_a_damaged_export_and_answers_as_before(checkpoint):
    """The probe's case: the default backend answered "unacceptable 1.000" to every sentence, exit 0."""
    before = run_inference(checkpoint.parent, "--checkpoint", str(checkpoint), *SENTENCES)
    damage_export(checkpoint.with_suffix(".onnx"), "classifier-weights")
    after = run_inference(checkpoint.parent, "--checkpoint", str(checkpoint), *SENTENCES)
    assert after.returncode == 0 and after.stdout == before.stdout
    assert after.stderr.splitlines() == [f"Exporting model.ckpt to ONNX again: the cached {checkpoint.with_suffix('.onnx')}"
                                         f" is {export.EXPORT_DAMAGED}..."]


def test_the_digest_is_an_ordinary_metadata_entry_of_the_export(checkpoint):
    import onnxruntime

    onnx_path = checkpoint.with_suffix(".onnx")
    content = onnx_path.read_bytes()[: -export.DIGEST_ENTRY_LENGTH]
    digest = onnxruntime.InferenceSession(onnx_path).get_modelmeta().custom_metadata_map[export.DIGEST_KEY]
    assert digest == export.xxhash.xxh3_64_hexdigest(content)
    assert {e.key: e.value for e in onnx.load(onnx_path).metadata_props}[export.DIGEST_KEY] == digest


def member_data_offset(path: Path, name_part: str) -> tuple[int, int]:
    """(offset, size) of the stored bytes of the checkpoint's zip member whose name ends with name_part."""
    with zipfile.ZipFile(path) as archive:
        member = next(m for m in archive.infolist() if m.filename.endswith(name_part))
        with archive.open(member) as f:  # positioned at the member's bytes once its header is read
            return f._fileobj.tell(), member.compress_size  # noqa: SLF001 (a test may look inside)


def damage_checkpoint(path: Path, how: str) -> None:
    if how == "classifier-weights":  # what the probe did: inference and resume ran, exit 0
        weights = torch.load(path, weights_only=True)["state_dict"]["model.classifier.weight"]
        flip_bytes(path, inside=weights.numpy().tobytes())
    elif how == "pickle":
        offset, size = member_data_offset(path, "data.pkl")
        flip_bytes(path, at=offset + size // 2, count=16)
    elif how == "member-header":
        with zipfile.ZipFile(path) as archive:
            flip_bytes(path, at=archive.infolist()[-1].header_offset, count=4)  # its signature
    elif how in ("member-name", "directory-name"):  # one character of a tensor's name, in either copy of it
        with zipfile.ZipFile(path) as archive:
            member = archive.infolist()[-1]
        data = path.read_bytes()
        name = member.filename.encode()
        at = member.header_offset + 30 if how == "member-name" else data.rfind(name)
        assert data[at : at + len(name)] == name
        flip_bytes(path, at=at + len(name) - 1, count=1)
    elif how == "zip-directory":
        flip_bytes(path, at=path.stat().st_size - 60, count=40)
    elif how == "middle":
        flip_bytes(path, at=path.stat().st_size // 2)
    elif how == "cut-short":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("how", ["classifier-weights", "pickle", "member-header", "member-name", "directory-name", "zip-directory",
                                 "middle", "cut-short"])
def test_a_damaged_checkpoint_is_refused_in_one_line_before_it_is_exported_or_served(checkpoint, tmp_path, how):
    """Exports of its undamaged content are there: they must not be served either."""
    damage_checkpoint(checkpoint, how)
    for backend in ("onnx", "onnx-int8", "torch"):
        with pytest.raises(CheckpointError) as error:
            Predictor(checkpoint, backend)
        message = str(error.value)
        assert message.startswith(f"{checkpoint}: ") and "\n" not in message
        assert ("damaged: " in message or "not a checkpoint: " in message), message
    if how in ("classifier-weights", "pickle", "middle"):
        assert "do not match their CRC-32" in message
    with pytest.raises(CheckpointError, match="damaged|not a checkpoint"):
        export.export_hf(checkpoint, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    if how == "classifier-weights":  # the probe's case (inference ran, exit 0); the command line is slow to start
        assert one_line_error(run_inference(tmp_path, "--checkpoint", str(checkpoint), "Hello.")) == f"error: {message}"


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_a_folder_where_the_export_goes_is_one_line_before_any_export(checkpoint, backend):
    export_path = checkpoint.with_suffix(".int8.onnx" if backend == "onnx-int8" else ".onnx")
    export_path.unlink()
    export_path.mkdir()
    with pytest.raises(CheckpointError, match=f"^{export_path}: a folder or other non-file is where the ONNX export of model.ckpt goes; move it away$"):
        Predictor(checkpoint, backend)


def test_a_checkpoint_that_is_no_regular_file_is_one_line(tmp_path):
    fifo = tmp_path / "model.ckpt"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    with pytest.raises(CheckpointError, match=f"^{fifo}: not a checkpoint: not a regular file"):
        Predictor(fifo)


@pytest.mark.parametrize("suffix", [".onnx", ".int8.onnx"])
def test_a_damaged_export_given_as_the_model_is_refused_in_one_line(checkpoint, suffix):
    """serve.py and inference.py also run an export alone (the image has no checkpoint): no rebuild possible."""
    export_path = checkpoint.with_suffix(suffix)
    damage_export(export_path, "classifier-weights")
    with pytest.raises(CheckpointError, match=f"^{export_path}: damaged or made by an older version .*; export it again"):
        Predictor(export_path, "onnx-int8" if suffix == ".int8.onnx" else "onnx")
