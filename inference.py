"""Predict whether English sentences are grammatical, with a checkpoint trained by train.py. Offline.

    python inference.py "The boy is sitting on a bench." "Him sat bench."
    python inference.py --file sentences.txt --json > predictions.jsonl
    cat sentences.txt | python inference.py -
    python inference.py --export exported/       # a folder transformers.pipeline() loads

Without --checkpoint it uses the best checkpoint of the most recent run under logs/cola.
This file imports neither Lightning nor datasets: they would double the start-up time.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig, AutoTokenizer
from transformers.utils import logging as transformers_logging

LOG_DIR = Path("logs/cola")
BATCH_SIZE = 64


class InputError(Exception):
    """A checkpoint or input file that cannot be used, reported as one line."""


def find_best_checkpoint(log_dir: Path = LOG_DIR) -> Path:
    """The checkpoint ModelCheckpoint marked best in the most recent run (highest version_N) that has one."""
    runs = sorted(log_dir.glob("version_*"), key=lambda d: int(d.name.split("_")[1]) if d.name[8:].isdigit() else -1)
    for run_dir in reversed(runs):
        best = best_checkpoint_of_run(run_dir)
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


def load_checkpoint(path: Path) -> dict:
    """torch.load without executing pickled code (weights_only), memory-mapped so that unused
    optimizer state in the file costs nothing."""
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, pickle.UnpicklingError, EOFError... for bad files
        reason = str(e).strip().splitlines()[0][:200]
        raise InputError(f"{path}: not a loadable checkpoint (truncated, tampered or another format): {reason}")


class ColaPredictor:
    """A trained CoLA classifier: `ColaPredictor("best.ckpt").predict(["Him sat bench."])`."""

    def __init__(self, checkpoint_path: str | Path, device: Optional[str] = None) -> None:
        path = Path(checkpoint_path)
        if path.is_dir():  # a run folder
            path = best_checkpoint_of_run(path) or path / "checkpoints" / "last.ckpt"
        checkpoint = load_checkpoint(path)
        if not {"hf_config", "tokenizer_files", "state_dict"} <= checkpoint.keys():
            raise InputError(f"{path}: not a checkpoint of this project (no model config or tokenizer inside)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = AutoConfig.for_model(**checkpoint["hf_config"])
        # Truncate as in training, and never past the model's position embeddings.
        trained_max_length = checkpoint.get("datamodule_hyper_parameters", {}).get("max_length", 128)
        self.max_length = min(trained_max_length, getattr(config, "max_position_embeddings", trained_max_length))
        weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        model_class = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]  # e.g. BertForSequenceClassification
        self.model = model_class.from_pretrained(None, config=config, state_dict=weights)
        self.model.to(self.device).eval()
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in checkpoint["tokenizer_files"].items():
                (Path(tmp) / name).write_text(text, encoding="utf-8")
            self.tokenizer = AutoTokenizer.from_pretrained(tmp)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @torch.inference_mode()
    def predict(self, sentences: list[str], batch_size: int = BATCH_SIZE, progress: bool = False) -> list[dict]:
        """One result per sentence, in order: {"sentence", "label", "probabilities": {label: p}},
        or {"sentence", "error"} for an empty sentence."""
        results: list[dict] = [{"sentence": s, "error": "empty sentence"} for s in sentences]
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        lengths = [len(ids) for ids in self.tokenizer([sentences[i] for i in todo])["input_ids"]] if todo else []
        truncated = sum(n > self.max_length for n in lengths)
        if truncated:
            print(f"warning: {truncated} sentence(s) longer than {self.max_length} tokens were truncated", file=sys.stderr)
        # Similar lengths share a batch, so dynamic padding adds few pad tokens.
        todo = [i for _, i in sorted(zip(lengths, todo))]
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        for batch in progress_bar(batches, enabled=progress):
            encoded = self.tokenizer(
                [sentences[i] for i in batch], truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            ).to(self.device)
            probabilities = self.model(**encoded).logits.float().softmax(dim=-1).cpu()
            for i, probs in zip(batch, probabilities.tolist()):
                best = max(range(len(probs)), key=probs.__getitem__)
                results[i] = {
                    "sentence": sentences[i],
                    "label": self.labels[best],
                    "probabilities": dict(zip(self.labels, probs)),
                }
        return results

    def export(self, out_dir: str | Path) -> None:
        """A Hugging Face model folder: `pipeline("text-classification", model=out_dir)` loads it offline."""
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)


def progress_bar(batches: list, enabled: bool):
    if not enabled or len(batches) < 20:
        return batches
    from tqdm import tqdm  # only for long inputs: a progress bar costs start-up time

    return tqdm(batches, desc="Predicting", unit="batch", file=sys.stderr)


def read_sentences(args: argparse.Namespace) -> list[str]:
    if args.file:
        source, name = None, args.file
    elif args.sentences == ["-"]:
        source, name = sys.stdin.buffer, "<stdin>"
    else:
        return args.sentences
    try:
        data = source.read() if source else Path(name).read_bytes()
    except OSError as e:
        raise InputError(f"{name}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{name}:{line}: not valid UTF-8; save the file as UTF-8") from None
    return text.splitlines()


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
    parser.add_argument("--checkpoint", help="a .ckpt file or a run folder (default: best of the latest run)")
    parser.add_argument("--json", action="store_true", help="one JSON object per input line")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    parser.add_argument("--export", metavar="DIR", help="write a Hugging Face model folder to DIR and exit")
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()  # "Loading weights" bars are noise on a command line
    if not (args.sentences or args.file or args.export):
        parser.error("give sentences, '-' for standard input, --file PATH, or --export DIR")

    sentences = [] if args.export else read_sentences(args)  # bad input fails before the model loads
    predictor = ColaPredictor(args.checkpoint or find_best_checkpoint())
    if args.export:
        predictor.export(args.export)
        print(f"Exported to {args.export}: pipeline('text-classification', model='{args.export}')")
        return
    print_results(predictor.predict(sentences, args.batch_size, progress=True), args.json)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
