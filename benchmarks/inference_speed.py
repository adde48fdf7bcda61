"""Inference speed and quality: plain transformers against Predictor's backends, and cold start.

    python benchmarks/inference_speed.py --checkpoint logs/cola/version_0/checkpoints/best-....ckpt \
        --sentences ../shared/data/cola/dev.tsv

One row per way of predicting (`inference_rows`, also imported by other scripts): sentences/s of
batches of 64 over the whole GLUE TSV; p50/p95 latency of one-sentence calls over its first
--loop_limit sentences; val MCC of the predictions against the file's labels; and the largest
difference of its probabilities from the reference row's, plain transformers in PyTorch fp32.
Cold start is process start to printed answer of `python inference.py`, median of --repeats runs,
against the seed approach (`TextClassifier.load_from_checkpoint`, which imports Lightning and rebuilds
the tokenizer from the original model).
"""

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime
import torch
from sklearn.metrics import matthews_corrcoef

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from readers import DataError, read_glue_tsv  # noqa: E402
from checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint  # noqa: E402
from export import load_torch_model, model_facts  # noqa: E402
from inference import BATCH_SIZE, Predictor, InputError  # noqa: E402

REFERENCE = "HF transformers, PyTorch (reference)"
OURS = {
    "torch": "Predictor, PyTorch (--backend torch)",
    "onnx": "Predictor, ONNX Runtime fp32 (default)",
    "onnx-int8": "Predictor, ONNX Runtime int8 (--backend onnx-int8)",
}
SENTENCE = "The boy is sitting on a bench."
SEED_APPROACH = """
import sys, torch
from transformers import AutoTokenizer
from model import TextClassifier
model = TextClassifier.load_from_checkpoint(sys.argv[1], map_location="cpu", weights_only=False).eval()
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
    predictor = Predictor(checkpoint, backend=backend)  # builds the ONNX caches if missing: not timed
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


def table(header: tuple[str, ...], rows: list[tuple[str, ...]], text_columns: int = 1) -> list[str]:
    """Aligned columns: the first text_columns to the left, numbers to the right (speed.py's tables too)."""
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        for cells in [header, *rows]
    ]


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def inference_table(rows: list[dict]) -> list[str]:
    reference = rows[0]
    return table(("predictor", "sent/s", "x ref", "p50 ms", "p95 ms", "x ref", "val MCC", "max |dp|"), [(
        r["name"], fmt(r["sentences_per_s"], ",.1f"), fmt(r["sentences_per_s"] / reference["sentences_per_s"], ".2f"),
        fmt(r["p50_ms"], ".2f"), fmt(r["p95_ms"], ".2f"), fmt(reference["p50_ms"] / r["p50_ms"], ".2f"),
        fmt(r["val_mcc"], ".4f"), fmt(r["max_abs_prob_diff"], ".1e"),
    ) for r in rows]) + ["x ref: speedup over the reference, in sentences/s (batched) and p50 latency (one a call)"]


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    gpu = torch.cuda.is_available()
    return {
        "cpu": cpu, "cpu_cores": os.cpu_count(), "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
        "cuda": torch.version.cuda if gpu else None, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": metadata.version("transformers"),
        "pytorch_lightning": metadata.version("pytorch-lightning"), "torch_threads": torch.get_num_threads(),
    }


def machine_lines(m: dict) -> list[str]:
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if m["gpu"] else "no GPU"
    return [f"machine   {m['cpu']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), {gpu}",
            f"software  Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
            f"transformers {m['transformers']}, pytorch-lightning {m['pytorch_lightning']}"]


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

    print("\n".join(machine_lines(machine_info())) + f", onnxruntime {onnxruntime.__version__}")
    print(f"{'cold start, inference.py (s, median)':<48} {ours:>8.2f}")
    print(f"{'cold start, load_from_checkpoint (s, median)':<48} {seed:>8.2f}")
    print(f"{'cold start ratio (ours / seed)':<48} {ours / seed:>8.2f}")
    print()
    print("\n".join(inference_table(rows)))

if __name__ == "__main__":
    try:
        main()
    except (InputError, CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
