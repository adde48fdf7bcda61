"""Inference speed and quality: plain transformers against ColaPredictor's backends, and cold start.

    python benchmarks/inference_speed.py --checkpoint logs/cola/version_0/checkpoints/best-....ckpt \
        --sentences ../shared/data/cola/dev.tsv

One row per way of predicting (`inference_rows`, also imported by other scripts): sentences/s of
batches of 64 over the whole GLUE TSV; p50/p95 latency of one-sentence calls over its first
--loop_limit sentences; val MCC of the predictions against the file's labels; and the largest
difference of its probabilities from the reference row's, plain transformers in PyTorch fp32.
Cold start is process start to printed answer of `python inference.py`, median of --repeats runs,
against the seed approach (`ColaModel.load_from_checkpoint`, which imports Lightning and rebuilds
the tokenizer from the original model).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime
import torch
import transformers
from sklearn.metrics import matthews_corrcoef

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from data import DataError, read_glue_tsv  # noqa: E402
from checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint  # noqa: E402
from export import load_torch_model, model_facts  # noqa: E402
from inference import BATCH_SIZE, ColaPredictor, InputError  # noqa: E402

REFERENCE = "HF transformers, PyTorch (reference)"
OURS = {
    "torch": "ColaPredictor, PyTorch (--backend torch)",
    "onnx": "ColaPredictor, ONNX Runtime fp32 (default)",
    "onnx-int8": "ColaPredictor, ONNX Runtime int8 (--backend onnx-int8)",
}
SENTENCE = "The boy is sitting on a bench."
SEED_APPROACH = """
import sys, torch
from transformers import AutoTokenizer
from model import ColaModel
model = ColaModel.load_from_checkpoint(sys.argv[1], map_location="cpu", weights_only=False).eval()
tokenizer = AutoTokenizer.from_pretrained(model.hparams.model_name_or_path)
with torch.no_grad():
    probs = model.model(**tokenizer([sys.argv[2]], return_tensors="pt")).logits.softmax(-1)[0]
print(model.model.config.id2label[int(probs.argmax())], float(probs.max()))
"""

Predict = Callable[[list[str]], np.ndarray]  # sentences -> probabilities, one row per sentence


def reference_predict(checkpoint: str) -> Predict:
    """What a transformers user writes: the model and tokenizer called directly, batches in file order."""
    contents = load_checkpoint(resolve_checkpoint(Path(checkpoint)))
    model, tokenizer = load_torch_model(contents)
    max_length = model_facts(contents)["max_length"]

    @torch.inference_mode()
    def predict(sentences: list[str]) -> np.ndarray:
        batches = [sentences[i : i + BATCH_SIZE] for i in range(0, len(sentences), BATCH_SIZE)]
        encoded = (tokenizer(b, padding=True, truncation=True, max_length=max_length, return_tensors="pt") for b in batches)
        return np.concatenate([model(**e).logits.softmax(-1).numpy() for e in encoded])

    return predict


def our_predict(checkpoint: str, backend: str) -> Predict:
    predictor = ColaPredictor(checkpoint, backend=backend)  # builds the ONNX caches if missing: not timed
    return lambda sentences: np.array([list(r["probabilities"].values()) for r in predictor.predict(sentences)])


def measure(predict: Predict, sentences: list[str], loop_limit: int) -> tuple[np.ndarray, float, list[float]]:
    """Probabilities for all sentences, sentences/s batched, and each one-sentence call's seconds."""
    predict(sentences[:BATCH_SIZE])  # warm-up: first-call allocations and kernel choices
    start = time.perf_counter()
    probabilities = predict(sentences)
    rate = len(sentences) / (time.perf_counter() - start)
    latencies = []
    for sentence in sentences[:loop_limit]:
        start = time.perf_counter()
        predict([sentence])
        latencies.append(time.perf_counter() - start)
    return probabilities, rate, latencies


def inference_rows(checkpoint: str, tsv: str, loop_limit: int = 300) -> list[dict]:
    """One dict per way of predicting, the reference first: name, sentences_per_s, p50_ms, p95_ms, val_mcc,
    max_abs_prob_diff (from the reference's probabilities; None for the reference)."""
    examples = list(read_glue_tsv(Path(tsv)))
    sentences, labels = [e["sentence"] for e in examples], [e["label"] for e in examples]
    # Built one at a time, so that only one model is in memory.
    makers = [(REFERENCE, lambda: reference_predict(checkpoint))]
    makers += [(name, lambda backend=backend: our_predict(checkpoint, backend)) for backend, name in OURS.items()]
    rows, reference = [], None
    for name, make in makers:
        probabilities, rate, latencies = measure(make(), sentences, loop_limit)
        if reference is None:
            reference = probabilities
        p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
        rows.append({
            "name": name,
            "sentences_per_s": rate,
            "p50_ms": float(p50),
            "p95_ms": float(p95),
            "val_mcc": float(matthews_corrcoef(labels, probabilities.argmax(axis=1))),
            "max_abs_prob_diff": None if name == REFERENCE else float(np.abs(probabilities - reference).max()),
        })
    return rows


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_rows(rows: list[dict]) -> None:
    reference = rows[0]
    print(f"{'predictor':<56} {'sent/s':>7} {'x ref':>6} {'p50 ms':>7} {'p95 ms':>7} {'x ref':>6} {'val MCC':>8} {'max |dp|':>9}")
    for row in rows:
        diff = "-" if row["max_abs_prob_diff"] is None else f"{row['max_abs_prob_diff']:.1e}"
        print(
            f"{row['name']:<56} {row['sentences_per_s']:>7.1f} {row['sentences_per_s'] / reference['sentences_per_s']:>6.2f}"
            f" {row['p50_ms']:>7.2f} {row['p95_ms']:>7.2f} {reference['p50_ms'] / row['p50_ms']:>6.2f}"
            f" {row['val_mcc']:>8.4f} {diff:>9}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sentences", required=True, help="a GLUE-layout TSV with labels, e.g. CoLA's dev.tsv")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop_limit", type=int, default=300, help="sentences timed one call each")
    args = parser.parse_args()

    checkpoint = str(Path(args.checkpoint).resolve())  # the cold-start commands run in the repository
    # The rows first: bad input fails at once, and the ONNX cache exists before cold starts are timed.
    rows = inference_rows(checkpoint, args.sentences, args.loop_limit)
    ours = median_seconds([sys.executable, "inference.py", "--checkpoint", checkpoint, SENTENCE], args.repeats)
    seed = median_seconds([sys.executable, "-c", SEED_APPROACH, checkpoint, SENTENCE], args.repeats)

    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}"
    )
    print(f"{'cold start, inference.py (s, median)':<48} {ours:>8.2f}")
    print(f"{'cold start, load_from_checkpoint (s, median)':<48} {seed:>8.2f}")
    print(f"{'cold start ratio (ours / seed)':<48} {ours / seed:>8.2f}")
    print()
    print_rows(rows)
    print("x ref: speedup over the reference, in sentences/s (batched) and in p50 latency (one sentence a call)")


if __name__ == "__main__":
    try:
        main()
    except (InputError, CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
