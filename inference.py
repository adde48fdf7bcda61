"""Predict whether English sentences are grammatical, with a checkpoint trained by train.py. Offline.

    python inference.py "The boy is sitting on a bench." "Him sat bench."
    python inference.py --file sentences.txt --json > predictions.jsonl
    cat sentences.txt | python inference.py -
    python inference.py --export exported/       # a folder transformers.pipeline() loads

Without --checkpoint it uses the best checkpoint of the most recent run under logs/cola.

Start-up time is the point of this file's shape: importing torch and transformers' BERT takes ~6 s
on a 2-core machine, onnxruntime and tokenizers ~0.3 s. So the first use of a checkpoint exports
its model to ONNX beside it (`best-....onnx`, with the tokenizer and labels in its metadata), and
every later run loads only that. `--backend onnx-int8` runs a copy with int8 weights instead (CPUs:
faster, probabilities ~0.02 off), `--backend torch` runs the checkpoint in PyTorch (GPUs).
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnxruntime
from tokenizers import Tokenizer

LOG_DIR = Path("logs/cola")
BATCH_SIZE = 64
BACKENDS = ("onnx", "onnx-int8", "torch")


class InputError(Exception):
    """A checkpoint or input file that cannot be used, reported as one line."""


def run_numbers(log_dir: Path) -> list[int]:
    """The N of each version_N run folder under log_dir (TensorBoardLogger's layout), newest first."""
    names = (d.name.removeprefix("version_") for d in log_dir.glob("version_*"))
    return sorted((int(n) for n in names if n.isdigit()), reverse=True)


def find_best_checkpoint(log_dir: Path = LOG_DIR) -> Path:
    """The checkpoint ModelCheckpoint marked best in the most recent run (highest version_N) that has one."""
    for number in run_numbers(log_dir):
        best = best_checkpoint_of_run(log_dir / f"version_{number}")
        if best is not None:
            return best
    raise InputError(f"no trained run under {log_dir}: train one first with `python train.py`, or pass --checkpoint")


def best_checkpoint_of_run(run_dir: Path) -> Optional[Path]:
    """metrics.json names the best checkpoint of a finished run; an unfinished run's last.ckpt remembers it."""
    best_path = None
    if (run_dir / "metrics.json").is_file():
        best_path = json.loads((run_dir / "metrics.json").read_text())["best_model_path"]
    elif (run_dir / "checkpoints" / "last.ckpt").is_file():
        state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["callbacks"]
        best_path = next((v["best_model_path"] for k, v in state.items() if k.startswith("ModelCheckpoint")), None)
    if not best_path:
        return None
    # The path was recorded relative to where training ran; the file sits in this run's checkpoints folder.
    best = run_dir / "checkpoints" / Path(best_path).name
    return best if best.is_file() else None


def resolve_checkpoint(path: Path) -> Path:
    """A .ckpt file as given, or the best checkpoint of a run folder."""
    if path.is_dir():
        best = best_checkpoint_of_run(path)
        if best is None:
            raise InputError(f"{path}: no best checkpoint in this run folder")
        return best
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    return path


def load_checkpoint(path: Path) -> dict:
    """torch.load without executing pickled code (weights_only); memory-mapped, so the optimizer state
    stored beside the weights costs nothing."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # RuntimeError, UnpicklingError, EOFError...: all mean "not a usable file"
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a loadable checkpoint (truncated, tampered or another format): {reason}")
    if not isinstance(checkpoint, dict) or not {"hf_config", "tokenizer_files", "state_dict"} <= checkpoint.keys():
        raise InputError(f"{path}: not a checkpoint of this project (no model config or tokenizer inside)")
    return checkpoint


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


def build_onnx(checkpoint_path: Path, onnx_path: Path) -> None:
    """Export the checkpoint's model to ONNX (dynamic batch and sequence axes), facts in its metadata."""
    import onnx
    import torch

    checkpoint = load_checkpoint(checkpoint_path)
    print(f"Exporting {checkpoint_path.name} to ONNX, once, for fast start-up from now on...", file=sys.stderr)
    model, tokenizer = load_classifier(checkpoint)
    example = dict(tokenizer(["An example.", "A longer example sentence."], padding=True, return_tensors="pt"))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    # The exporter reports progress on stdout and warns about internals: keep stdout for predictions.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
    # that step skipped the graph and the results come out the same. Silence the advice.
    logging.disable(logging.WARNING)
    try:
        # Unsigned weights: on MiniLM (AVX2 CPU) signed ones cost 0.03 of CoLA val MCC, unsigned 0.007;
        # per-channel scales or reduce_range did no better.
        quantize_dynamic(onnx_path, int8_path, weight_type=QuantType.QUInt8)
    finally:
        logging.disable(logging.NOTSET)


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


def onnx_session(checkpoint_path: Path, int8: bool = False) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session for the checkpoint, exported (and quantized) once and cached beside it."""
    path = cached(checkpoint_path.with_suffix(".onnx"), checkpoint_path, lambda p: build_onnx(checkpoint_path, p))
    if int8:
        fp32 = path
        path = cached(checkpoint_path.with_suffix(".int8.onnx"), checkpoint_path, lambda p: build_int8(fp32, p))
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


class ColaPredictor:
    """A trained CoLA classifier: `ColaPredictor("best.ckpt").predict(["Him sat bench."])`.

    backend "onnx" (default) runs the cached ONNX export on CPU with ONNX Runtime; "onnx-int8" its cached
    int8-weight copy (faster on CPU; probabilities ~0.02 off, and shifting a little with the batch a
    sentence is in); "torch" runs the checkpoint in PyTorch, on the GPU when there is one.
    """

    def __init__(self, checkpoint_path: str | Path, backend: str = "onnx") -> None:
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        path = resolve_checkpoint(Path(checkpoint_path))
        if backend != "torch":
            session = onnx_session(path, int8=backend == "onnx-int8")
            facts = session.get_modelmeta().custom_metadata_map
            self.input_names = [i.name for i in session.get_inputs()]
            self._logits: Callable[[dict], np.ndarray] = lambda inputs: session.run(["logits"], inputs)[0]
        else:
            checkpoint = load_checkpoint(path)
            facts = model_facts(checkpoint)
            classifier, tokenizer = load_classifier(checkpoint)
            self.input_names = tokenizer.model_input_names
            self._logits = torch_logits_function(classifier)
        self.labels = facts["labels"] if isinstance(facts["labels"], list) else json.loads(facts["labels"])
        self.max_length = int(facts["max_length"])
        self.pad_token_id = int(facts["pad_token_id"])
        self.tokenizer = Tokenizer.from_str(facts["tokenizer"])
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()

    def predict(self, sentences: list[str], batch_size: int = BATCH_SIZE, progress: bool = False) -> list[dict]:
        """One result per sentence, in order: {"sentence", "label", "probabilities": {label: p}},
        or {"sentence", "error"} for an empty sentence. InputError for input that is not text."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
        if isinstance(sentences, str):
            raise InputError("sentences must be a list of strings, not one string")
        for number, sentence in enumerate(sentences, start=1):
            if not isinstance(sentence, str):
                raise InputError(f"sentence {number} is a {type(sentence).__name__}, not a string")
            try:
                sentence.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate, e.g. from undecodable bytes in sys.argv
                raise InputError(f"sentence {number} is not valid Unicode text ({e.reason})") from None
        results: list[dict] = [{"sentence": s, "error": "empty sentence"} for s in sentences]
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        encodings = dict(zip(todo, self.tokenizer.encode_batch([sentences[i] for i in todo])))
        truncated = sum(bool(e.overflowing) for e in encodings.values())
        if truncated:
            print(f"warning: {truncated} sentence(s) longer than {self.max_length} tokens were truncated", file=sys.stderr)
        # Similar lengths share a batch, so padding each batch to its longest sentence adds little.
        todo.sort(key=lambda i: len(encodings[i].ids))
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        for batch in progress_bar(batches, enabled=progress):
            logits = self._logits(self._pad([encodings[i] for i in batch])).astype(np.float64)
            probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            for i, probs in zip(batch, probabilities.tolist()):
                results[i] = {
                    "sentence": sentences[i],
                    "label": self.labels[int(np.argmax(probs))],
                    "probabilities": dict(zip(self.labels, probs)),
                }
        return results

    def _pad(self, encodings: list) -> dict[str, np.ndarray]:
        width = max(len(e.ids) for e in encodings)
        arrays = {
            "input_ids": np.full((len(encodings), width), self.pad_token_id, dtype=np.int64),
            "attention_mask": np.zeros((len(encodings), width), dtype=np.int64),
            "token_type_ids": np.zeros((len(encodings), width), dtype=np.int64),
        }
        for row, e in enumerate(encodings):
            n = len(e.ids)
            arrays["input_ids"][row, :n], arrays["attention_mask"][row, :n] = e.ids, 1
            arrays["token_type_ids"][row, :n] = e.type_ids
        return {name: arrays[name] for name in self.input_names}


def torch_logits_function(classifier) -> Callable[[dict], np.ndarray]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classifier.to(device)

    @torch.inference_mode()
    def logits(inputs: dict) -> np.ndarray:
        return classifier(**{k: torch.from_numpy(v).to(device) for k, v in inputs.items()}).float().cpu().numpy()

    return logits


def export_hf(checkpoint_path: Path, out_dir: str) -> None:
    """A Hugging Face model folder: `pipeline("text-classification", model=out_dir)` loads it offline."""
    path = resolve_checkpoint(checkpoint_path)
    checkpoint = load_checkpoint(path)
    if pooling(checkpoint) != "cls":
        raise InputError(
            f"{path}: trained with --model.pooling {pooling(checkpoint)}, which transformers' pipeline() does not"
            " do (it classifies the [CLS] vector); predict with inference.py instead"
        )
    model, tokenizer = load_torch_model(checkpoint)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def progress_bar(batches: list, enabled: bool):
    if not enabled or len(batches) < 20:
        return batches
    from tqdm import tqdm  # only for long inputs: it costs start-up time

    return tqdm(batches, desc="Predicting", unit="batch", file=sys.stderr)


def read_sentences(args: argparse.Namespace) -> list[str]:
    """The sentences to classify: the arguments, or one per line of a UTF-8 file or standard input."""
    if args.file:
        source, name = None, args.file
    elif args.sentences == ["-"]:
        source, name = sys.stdin.buffer, "<stdin>"
    else:
        for number, sentence in enumerate(args.sentences, start=1):
            try:
                sentence.encode("utf-8")
            except UnicodeEncodeError:  # Python keeps undecodable argument bytes as lone surrogates
                raise InputError(f"argument {number} is not valid UTF-8") from None
        return args.sentences
    try:
        data = source.read() if source else Path(name).read_bytes()
    except OSError as e:
        raise InputError(f"{name}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: without the byte-order mark some Windows editors write
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{name}:{line}: not valid UTF-8; save the file as UTF-8") from None
    # Lines end at \n (or \r\n) only: str.splitlines() would also split at characters such as \x0c or
    # \u2028 inside a sentence, and the output would no longer have one line per input line.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the file's final newline ends the last line; it does not start another
    return [line.removesuffix("\r") for line in lines]


def print_results(results: list[dict], as_json: bool) -> None:
    if as_json:
        for result in results:
            print(json.dumps(result, ensure_ascii=False))
        return
    width = max((len(r["label"]) for r in results if "label" in r), default=0)
    for line_no, result in enumerate(results, start=1):
        if "error" in result:
            print(f"warning: input {line_no} skipped: {result['error']}", file=sys.stderr)
            continue
        probability = result["probabilities"][result["label"]]
        print(f"{result['label']:<{width}}  {probability:.3f}  {result['sentence']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentences", nargs="*", help="sentences to classify; '-' reads them from standard input")
    parser.add_argument("--file", help="a UTF-8 text file, one sentence per line")
    parser.add_argument("--checkpoint", type=Path, help="a .ckpt file or a run folder (default: best of the latest run)")
    parser.add_argument("--json", action="store_true", help="one JSON object per input line")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    parser.add_argument("--backend", choices=BACKENDS, default="onnx", help="torch uses the GPU if present")
    parser.add_argument("--export", metavar="DIR", help="write a Hugging Face model folder to DIR and exit")
    args = parser.parse_args()
    if not (args.sentences or args.file or args.export):
        parser.error("give sentences, '-' for standard input, --file PATH, or --export DIR")

    checkpoint = args.checkpoint or find_best_checkpoint()
    if args.export:
        export_hf(checkpoint, args.export)
        print(f"Exported to {args.export}: pipeline('text-classification', model='{args.export}')")
        return
    sentences = read_sentences(args)  # bad input fails before the model loads
    predictor = ColaPredictor(checkpoint, backend=args.backend)
    print_results(predictor.predict(sentences, args.batch_size, progress=True), args.json)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
