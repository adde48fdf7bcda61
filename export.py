"""Exports of a checkpoint trained by train.py: ONNX (what inference.py runs), its int8 copy, and a
Hugging Face model folder. Each import of torch, transformers or onnx happens inside the function that
needs it, so that importing this module costs nothing on inference's fast path.
"""

import contextlib
import errno
import functools
import hashlib
import json
import logging
import mmap
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import xxhash

from checkpoints import (
    CheckpointError, file_identity, first_line, load_checkpoint, remove_dead_writers_files, resolve_checkpoint, temporary_path,
)

if TYPE_CHECKING:
    import onnx
    import onnxruntime


def model_facts(checkpoint: dict) -> dict:
    """What prediction needs besides the weights: labels, tokenizer, truncation length, padding id, texts, task."""
    config = checkpoint["hf_config"]
    id2label = {int(k): v for k, v in config["id2label"].items()}
    trained_max_length = checkpoint.get("datamodule_hyper_parameters", {}).get("max_length", 128)
    return {
        "labels": [id2label[i] for i in range(len(id2label))],
        # Truncate as in training, and never past the model's position embeddings.
        "max_length": min(trained_max_length, config.get("max_position_embeddings", trained_max_length)),
        "tokenizer": checkpoint["tokenizer_files"]["tokenizer.json"],
        "pad_token_id": config.get("pad_token_id") or 0,
        # A text or a pair, and the task (GLUE's file for --glue_test): checkpoints from before they were
        # recorded are CoLA's.
        "text_names": config.get("text_names", ["sentence"]),
        "task": config.get("finetuning_task") or "cola",
    }


def load_torch_model(checkpoint: dict):
    """The checkpoint's transformers model, in eval mode, and its transformers tokenizer."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars are noise on a command line

    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        config = AutoConfig.for_model(**checkpoint["hf_config"])
        model_class = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]  # e.g. BertForSequenceClassification
        model, loading = model_class.from_pretrained(None, config=config, state_dict=weights, output_loading_info=True)
    except Exception as e:  # ValueError, KeyError, RuntimeError (shapes)...: the config does not build this model
        raise CheckpointError(f"the checkpoint's model config does not fit its weights: {first_line(e)}") from None
    # from_pretrained fills missing weights with random ones and only logs it: that would serve an untrained model.
    missing = loading["missing_keys"] or loading["mismatched_keys"]
    if missing:
        raise CheckpointError(f"the checkpoint's weights do not fit its model config: {sorted(missing)[0]} missing")
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in checkpoint["tokenizer_files"].items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    return model, tokenizer


def pooling(checkpoint: dict) -> str:
    """How the checkpoint's model pools a sentence ("cls" or "mean", train.py's --model.pooling)."""
    return checkpoint.get("hyper_parameters", {}).get("pooling", "cls")


def load_classifier(checkpoint: dict):
    """The checkpoint's model as training computed its logits (inputs in, logits out), and its tokenizer."""
    from model import SentenceClassifier  # Lightning comes with it: only the torch and export paths pay for it

    model, tokenizer = load_torch_model(checkpoint)
    return SentenceClassifier(model, pooling(checkpoint)), tokenizer


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence what exporters print about their internals (torch.onnx warns that torchvision is missing, reports
    progress on stdout...): nothing a user can act on, and stdout is for predictions. Errors still raise."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def build_onnx(checkpoint: dict, classifier: tuple, onnx_path: Path, made_from: dict) -> None:
    """Export the checkpoint's model (classifier: load_classifier's) to ONNX (dynamic batch and sequence
    axes), facts in its metadata together with made_from (what identifies the checkpoint file)."""
    import onnx
    import torch

    model, tokenizer = classifier
    example = dict(tokenizer(["An example.", "A longer example sentence."], padding=True, return_tensors="pt"))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with quiet_libraries():
        program = torch.onnx.export(
            model, (), kwargs=example, input_names=list(example), output_names=["logits"], dynamo=True,
            dynamic_shapes={name: {0: batch, 1: sequence} for name in example}, verbose=False,
        )
    program.save(onnx_path, external_data=False)
    model_proto = onnx.load(onnx_path)
    facts = model_facts(checkpoint)
    facts = {k: v if isinstance(v, str) else json.dumps(v) for k, v in facts.items()}
    # Named in the export too, so that a copy served without its run folder (the image) still says which.
    base_model = checkpoint.get("hyper_parameters", {}).get("model_name_or_path")
    if isinstance(base_model, str):
        facts["base_model"] = base_model
    onnx.helper.set_model_props(model_proto, {**facts, **made_from})
    onnx.save(model_proto, onnx_path)


def int8_source(onnx_path: Path, checkpoint_path: Path) -> "onnx.ModelProto":
    """The fp32 export (of checkpoint_path, named in errors) as build_int8 takes it: without the fp32 file's
    digest (the int8 file gets its own), and refused if a weight is NaN or infinite: it has no int8 scale
    (quantize_dynamic fails with a bare AssertionError)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path)
    kept = [entry for entry in model.metadata_props if entry.key != DIGEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    weights = (numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    if not all(np.isfinite(w).all() for w in weights):
        raise CheckpointError(f"{checkpoint_path}: its weights hold NaN or infinity (damaged), which int8 cannot quantize; pick another checkpoint")
    return model


def build_int8(model: "onnx.ModelProto", int8_path: Path) -> None:
    """The fp32 export (int8_source's) with int8 weights; activations are quantized per call (dynamic
    quantization). The metadata (tokenizer, labels, the checkpoint's sha256) is kept."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic advises quant_pre_process first: on this export its shape inference fails, and with
    # that step skipped the graph and the results come out the same. quiet_libraries() silences the advice.
    with quiet_libraries():
        # Unsigned weights: on MiniLM (AVX2 CPU) signed ones cost 0.03 of CoLA val MCC, unsigned 0.007;
        # per-channel scales or reduce_range did no better.
        quantize_dynamic(model, int8_path, weight_type=QuantType.QUInt8)


# An export carries a digest of its own bytes, checked on every load: ONNX Runtime checks none, and changed
# weights would serve wrong answers without a word. The digest is the last metadata entry: protobuf reads
# an entry appended to a serialized model as one more, so the file is its content, then the digest of that
# content. xxh3-64, not sha256: this finds damage, not forgery (whoever can write the export can write its
# digest), and on MiniLM's 92 MB it took 0.004-0.02 s, CRC-32 0.09-0.14 s, sha256 0.23-0.27 s
# (benchmarks/README.md, "Integrity checks at start-up").
DIGEST_KEY = "content_xxh3_64"


def digest_entry(digest: str) -> bytes:
    """{DIGEST_KEY: digest} as the serialized ModelProto field metadata_props (14, length-delimited) holding a
    StringStringEntryProto (key: field 1, value: field 2); every length here is below 128, one byte."""
    key, value = DIGEST_KEY.encode(), digest.encode()
    entry = bytes([0x0A, len(key)]) + key + bytes([0x12, len(value)]) + value
    return bytes([14 << 3 | 2, len(entry)]) + entry


DIGEST_ENTRY_LENGTH = len(digest_entry("0" * 16))


def content_digest(data, end: int) -> str:
    with memoryview(data)[:end] as content:  # no copy; released before the memory map closes
        return xxhash.xxh3_64_hexdigest(content)


def append_digest(path: Path) -> None:
    """Append the digest entry of the export at path (see DIGEST_KEY)."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        digest = content_digest(data, len(data))
        f.seek(0, os.SEEK_END)
        f.write(digest_entry(digest))


EXPORT_DAMAGED = "damaged or made by an older version (its bytes do not match the digest it ends with)"


def export_intact(data: bytes) -> bool:
    """Whether an export's bytes end with the digest of the bytes before them (see DIGEST_KEY). The bytes, not
    the file: ONNX Runtime is then given these very bytes, so a file written over after the check (or while
    serving) never reaches it unchecked."""
    end = len(data) - DIGEST_ENTRY_LENGTH
    return end > 0 and data[end:] == digest_entry(content_digest(data, end))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def user_cache_dir() -> Path:
    """Where exports of checkpoints in read-only folders go (the XDG convention), one per checkpoint content."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlops-one"


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


class CachedExport:
    """The ONNX export of one checkpoint, and its int8 copy, each checked against the checkpoint's content.

    An export carries the checkpoint's sha256 (and its file identity, to skip hashing) in its metadata, and
    ends with a digest of its own bytes (append_digest): a cache whose bytes changed, that does not load, or
    that was made from other weights, is rebuilt, saying so in one line.
    Beside the checkpoint if that folder is writable (or already holds a good export), else in the user's
    cache folder under the checkpoint's sha256 (so a read-only folder costs one hash, ~0.12 s for 90 MB,
    per start: the name of its cached export)."""

    def __init__(self, checkpoint_path: Path) -> None:
        self.checkpoint_path = checkpoint_path
        self.identity = file_identity(checkpoint_path)  # before hashing and loading: a later change shows

    @functools.cached_property
    def sha256(self) -> str:
        return file_sha256(self.checkpoint_path)

    def session(self, int8: bool = False) -> tuple[Path, "onnxruntime.InferenceSession"]:
        """A valid, current export's path and its loaded ONNX Runtime session, built first if need be."""
        suffix = ".int8.onnx" if int8 else ".onnx"
        beside = self.checkpoint_path.with_suffix(suffix)
        session, reason = self.load(beside)
        if session:
            return beside, session
        path = beside if writable(beside.parent) else user_cache_dir() / f"{self.sha256}{suffix}"
        if path != beside:
            session, cache_reason = self.load(path)
            if session:
                return path, session
            reason = cache_reason or reason
        if path.exists() and not path.is_file():  # the export could never replace it
            raise CheckpointError(f"{path}: a folder or other non-file is where the ONNX export of {self.checkpoint_path.name} goes; move it away")
        if int8:
            fp32_path, _ = self.session()
            model = int8_source(fp32_path, self.checkpoint_path)  # NaN weights fail here, before the line below
            build = lambda p: build_int8(model, p)  # noqa: E731
            action = f"Quantizing {fp32_path.name} to int8"
        else:
            made_from = self.metadata()  # hashed before loading: weights changed meanwhile show as a mismatch
            checkpoint = load_checkpoint(self.checkpoint_path)
            classifier = load_classifier(checkpoint)  # a damaged checkpoint fails here, before the line below
            build = lambda p: build_onnx(checkpoint, classifier, p, made_from)  # noqa: E731
            action = f"Exporting {self.checkpoint_path.name} to ONNX"
        print(f"{action} {reason or 'once, for fast start-up from now on'}...", file=sys.stderr)
        write_atomically(path, build)
        session, reason = self.load(path)
        if session is None:
            raise CheckpointError(f"{self.checkpoint_path}: its fresh ONNX export does not load ({reason})")
        return path, session

    def load(self, path: Path) -> tuple[Optional["onnxruntime.InferenceSession"], Optional[str]]:
        """(the session, None) for a good export at path; (None, why it must be built) otherwise."""
        import onnxruntime

        try:
            data = path.read_bytes()
        except OSError:  # none yet (or unreadable: rebuilt, and the write says why if it cannot be)
            return None, None
        if not export_intact(data):
            return None, f"again: the cached {path} is {EXPORT_DAMAGED}"
        try:
            session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime's InvalidProtobuf, Fail...: truncated or overwritten
            return None, f"again: the cached {path} is damaged"
        made_from = session.get_modelmeta().custom_metadata_map
        if made_from.get("checkpoint_identity") == self.identity or made_from.get("checkpoint_sha256") == self.sha256:
            return session, None
        return None, f"again: the cached {path} does not match {self.checkpoint_path.name}'s content (other weights)"

    def metadata(self) -> dict:
        return {"checkpoint_sha256": self.sha256, "checkpoint_identity": self.identity}


def write_atomically(path: Path, build: Callable[[Path], None]) -> None:
    """build() writes a temporary file beside path, ended with its digest, which then replaces path in one
    step: a concurrent or interrupted run never sees half a file, and an interrupted or failed build leaves
    nothing behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # reported below, as for a folder that exists but is read-only
    if not writable(path.parent):
        raise CheckpointError(
            f"cannot cache the ONNX export: {path.parent} is not writable; set XDG_CACHE_HOME to a writable"
            " folder, or use --backend torch"
        )
    remove_dead_writers_files(path.parent)
    tmp_path = temporary_path(path)
    try:
        build(tmp_path)
        append_digest(tmp_path)
        os.replace(tmp_path, path)
    except OSError as e:  # a full disk, say
        raise CheckpointError(f"cannot write the ONNX export {path}: {e.strerror or e}") from None
    finally:
        tmp_path.unlink(missing_ok=True)


def onnx_export(checkpoint_path: Path, int8: bool = False) -> Path:
    """The path of the checkpoint's current ONNX export (or its int8 copy), built if missing, damaged or stale."""
    return CachedExport(checkpoint_path).session(int8)[0]


def export_hf(checkpoint_path: Path, out_dir: str) -> None:
    """A Hugging Face model folder: `pipeline("text-classification", model=out_dir)` loads it offline.
    out_dir must be new or empty (an export never mixes with other files); it appears complete or not
    at all. OSError (FileExistsError, PermissionError...) when it cannot be written."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        kind = "a folder that is not empty" if out.is_dir() else "an existing file"
        raise FileExistsError(errno.EEXIST, f"{kind}; give a new or empty folder")
    parent = next(p for p in out.absolute().parents if p.exists())  # checked now, before the slow part
    if not parent.is_dir() or not writable(parent):
        raise PermissionError(errno.EACCES, f"cannot write in {parent}")
    path = resolve_checkpoint(checkpoint_path)
    checkpoint = load_checkpoint(path)
    if pooling(checkpoint) != "cls":
        raise CheckpointError(
            f"{path}: trained with --model.pooling {pooling(checkpoint)}, which transformers' pipeline() does not"
            " do (it classifies the [CLS] vector); predict with inference.py instead"
        )
    model, tokenizer = load_torch_model(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_files(out.parent)
    tmp = temporary_path(out)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # replaces a missing or empty folder in one step
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
