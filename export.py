"""Exports of a checkpoint trained by train.py: ONNX (what inference.py runs), its int8 copy, and a
Hugging Face model folder. Each import of torch, transformers or onnx happens inside the function that
needs it, so that importing this module costs nothing on inference's fast path.
"""

import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

from checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint


def model_facts(checkpoint: dict) -> dict:
    """What prediction needs besides the weights: labels, tokenizer, truncation length, padding id."""
    config = checkpoint["hf_config"]
    id2label = {int(k): v for k, v in config["id2label"].items()}
    trained_max_length = checkpoint.get("datamodule_hyper_parameters", {}).get("max_length", 128)
    return {
        "labels": [id2label[i] for i in range(len(id2label))],
        # Truncate as in training, and never past the model's position embeddings.
        "max_length": min(trained_max_length, config.get("max_position_embeddings", trained_max_length)),
        "tokenizer": checkpoint["tokenizer_files"]["tokenizer.json"],
        "pad_token_id": config.get("pad_token_id") or 0,
    }


def load_torch_model(checkpoint: dict):
    """The checkpoint's transformers model, in eval mode, and its transformers tokenizer."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars are noise on a command line

    config = AutoConfig.for_model(**checkpoint["hf_config"])
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model_class = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]  # e.g. BertForSequenceClassification
    model = model_class.from_pretrained(None, config=config, state_dict=weights).eval()
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


def build_onnx(checkpoint_path: Path, onnx_path: Path) -> None:
    """Export the checkpoint's model to ONNX (dynamic batch and sequence axes), facts in its metadata."""
    import onnx
    import torch

    checkpoint = load_checkpoint(checkpoint_path)
    print(f"Exporting {checkpoint_path.name} to ONNX, once, for fast start-up from now on...", file=sys.stderr)
    model, tokenizer = load_classifier(checkpoint)
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
    onnx.helper.set_model_props(model_proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in facts.items()})
    onnx.save(model_proto, onnx_path)


def build_int8(onnx_path: Path, int8_path: Path) -> None:
    """The fp32 export with int8 weights; activations are quantized per call (dynamic quantization).
    The metadata (tokenizer, labels) is kept."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    print(f"Quantizing {onnx_path.name} to int8, once...", file=sys.stderr)
    # quantize_dynamic advises quant_pre_process first: on this export its shape inference fails, and with
    # that step skipped the graph and the results come out the same. quiet_libraries() silences the advice.
    with quiet_libraries():
        # Unsigned weights: on MiniLM (AVX2 CPU) signed ones cost 0.03 of CoLA val MCC, unsigned 0.007;
        # per-channel scales or reduce_range did no better.
        quantize_dynamic(onnx_path, int8_path, weight_type=QuantType.QUInt8)


def cached(path: Path, checkpoint_path: Path, build: Callable[[Path], None]) -> Path:
    """path, built by build() unless it is newer than the checkpoint (one saved again: the run went on)."""
    if path.is_file() and path.stat().st_mtime >= checkpoint_path.stat().st_mtime:
        return path
    if not os.access(path.parent, os.W_OK):
        path = Path(tempfile.mkdtemp()) / path.name  # read-only run folder: no cache
    tmp_path = path.with_suffix(f".tmp{os.getpid()}")
    build(tmp_path)
    os.replace(tmp_path, path)  # atomic: a concurrent or interrupted run never sees half a file
    return path


def onnx_export(checkpoint_path: Path, int8: bool = False) -> Path:
    """The checkpoint's ONNX export (or its int8 copy), built once and cached beside the checkpoint."""
    path = cached(checkpoint_path.with_suffix(".onnx"), checkpoint_path, lambda p: build_onnx(checkpoint_path, p))
    if int8:
        fp32 = path
        path = cached(checkpoint_path.with_suffix(".int8.onnx"), checkpoint_path, lambda p: build_int8(fp32, p))
    return path


def export_hf(checkpoint_path: Path, out_dir: str) -> None:
    """A Hugging Face model folder: `pipeline("text-classification", model=out_dir)` loads it offline."""
    path = resolve_checkpoint(checkpoint_path)
    checkpoint = load_checkpoint(path)
    if pooling(checkpoint) != "cls":
        raise CheckpointError(
            f"{path}: trained with --model.pooling {pooling(checkpoint)}, which transformers' pipeline() does not"
            " do (it classifies the [CLS] vector); predict with inference.py instead"
        )
    model, tokenizer = load_torch_model(checkpoint)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
