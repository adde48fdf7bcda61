"""Inference speed: cold start of `python inference.py` and batched throughput, each against the naive way.

    python benchmarks/inference_speed.py --checkpoint logs/cola/version_0/checkpoints/best-....ckpt \
        --sentences ../shared/data/cola/dev.tsv

Cold start is process start to printed answer, median of --repeats runs, against the seed approach
(`ColaModel.load_from_checkpoint`, which imports Lightning and rebuilds the tokenizer from the original
model). Throughput is sentences/s of `ColaPredictor.predict` on the whole file, batched, against
calling it one sentence at a time, with the ONNX Runtime and the PyTorch backends.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from inference import ColaPredictor  # noqa: E402

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


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sentences", required=True, help="a GLUE TSV (sentence in column 4) or one sentence a line")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop_limit", type=int, default=300, help="sentences timed in the one-at-a-time loop")
    args = parser.parse_args()

    ours = median_seconds([sys.executable, "inference.py", "--checkpoint", args.checkpoint, SENTENCE], args.repeats)
    seed = median_seconds([sys.executable, "-c", SEED_APPROACH, args.checkpoint, SENTENCE], args.repeats)

    lines = Path(args.sentences).read_text(encoding="utf-8").splitlines()
    sentences = [line.split("\t")[3] if line.count("\t") == 3 else line for line in lines]
    rates = {}
    for backend in ("onnx", "torch"):
        predictor = ColaPredictor(args.checkpoint, backend=backend)
        predictor.predict(sentences[:64])  # warm-up
        start = time.perf_counter()
        predictor.predict(sentences)
        rates[f"batched, {backend}"] = len(sentences) / (time.perf_counter() - start)
        start = time.perf_counter()
        for sentence in sentences[: args.loop_limit]:
            predictor.predict([sentence])
        rates[f"one at a time, {backend}"] = min(len(sentences), args.loop_limit) / (time.perf_counter() - start)

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"{'measure':<48} {'value':>8}")
    print(f"{'cold start, inference.py (s, median)':<48} {ours:>8.2f}")
    print(f"{'cold start, load_from_checkpoint (s, median)':<48} {seed:>8.2f}")
    print(f"{'cold start ratio (ours / seed)':<48} {ours / seed:>8.2f}")
    for name, rate in rates.items():
        print(f"{name + ', sentences/s':<48} {rate:>8.1f}")
    for loop in ("onnx", "torch"):
        ratio = rates["batched, onnx"] / rates[f"one at a time, {loop}"]
        print(f"{'batched onnx / one at a time ' + loop:<48} {ratio:>8.1f}")

if __name__ == "__main__":
    main()
