"""Issue 22's trial: training-step and inference time of --model.pooling mix and --model.num_layers 4 against
the laptop recipe, interleaved step by step in one process so that the machine's load hits every variant alike.

    python benchmarks/layer_trial_speed.py --model $M --data_dir ../shared/data/cola --steps 40 \\
        --checkpoints base=A.ckpt mix=B.ckpt layers4=C.ckpt        # inference: ColaPredictor (ONNX) on dev.tsv
    python benchmarks/layer_trial_speed.py --model /tmp/bert-base --data_dir ../shared/data/cola \\
        --variants base,mix --steps 8                               # BERT-base shapes (speed.py --make_bert_base)

Training: each variant is a ColaModel with the laptop recipe's options (mean pooling, layer decay 0.9, head lr
1e-3, frozen word vectors) plus its own; every step runs the same batch of 32 training sentences (length-grouped,
as train.py batches) through each variant in turn: forward, backward, fused AdamW step. Prints seconds per step
and each variant's time over the base's (sums over the timed steps), and the load average before and after.
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from data import read_glue_tsv  # noqa: E402
from model import ColaModel  # noqa: E402

VARIANTS = {"base": {"pooling": "mean"}, "mix": {"pooling": "mix"}, "layers4": {"pooling": "mean", "num_layers": 4}}


def training_batches(model: ColaModel, train_tsv: Path, count: int, size: int = 32) -> list[dict]:
    rows = list(read_glue_tsv(train_tsv))
    random.Random(0).shuffle(rows)
    picked = sorted(rows[: count * size], key=lambda row: len(row["sentence"]))  # similar lengths share a batch
    batches = []
    for start in range(0, count * size, size):
        chunk = picked[start : start + size]
        batch = model.tokenizer([r["sentence"] for r in chunk], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batches.append({**batch, "labels": torch.tensor([r["label"] for r in chunk])})
    random.Random(1).shuffle(batches)
    return batches


def time_training(args: argparse.Namespace, names: list[str]) -> None:
    models = {}
    for name in names:
        torch.manual_seed(0)
        model = ColaModel(args.model, layer_decay=0.9, head_learning_rate=1e-3, freeze_word_embeddings=True, **VARIANTS[name])
        models[name] = (model, torch.optim.AdamW(model.parameter_groups(), lr=model.hparams.learning_rate, fused=True))
    batches = training_batches(models[names[0]][0], Path(args.data_dir) / "train.tsv", args.steps + args.warmup)
    seconds = {name: 0.0 for name in names}
    for step, batch in enumerate(batches):
        order = names if step % 2 == 0 else names[::-1]  # neither variant always runs first
        for name in order:
            model, optimizer = models[name]
            start = time.perf_counter()
            _, loss = model(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= args.warmup:
                seconds[name] += time.perf_counter() - start
    for name in names:
        print(f"train {name:8s} {seconds[name] / args.steps:.3f} s/step  {seconds[name] / seconds[names[0]]:.3f}x the time of {names[0]}")


def time_inference(args: argparse.Namespace) -> None:
    from inference import ColaPredictor

    sentences = [row["sentence"] for row in read_glue_tsv(Path(args.data_dir) / "dev.tsv")]
    predictors = {name: ColaPredictor(path) for name, path in (item.split("=", 1) for item in args.checkpoints)}
    seconds = {name: 0.0 for name in predictors}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, predictor in predictors.items() if repeat % 2 else reversed(predictors.items()):
            start = time.perf_counter()
            predictor.predict(sentences)
            if repeat:
                seconds[name] += time.perf_counter() - start
    first = next(iter(predictors))
    for name in predictors:
        rate = len(sentences) * args.repeats / seconds[name]
        print(f"infer {name:8s} {rate:.1f} sentences/s (ONNX, batches of 64)  {seconds[name] / seconds[first]:.3f}x the time of {first}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--variants", default="base,mix,layers4", help="comma-separated, the first is the reference")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--checkpoints", nargs="*", default=[], help="name=best.ckpt pairs to time inference of")
    parser.add_argument("--repeats", type=int, default=5, help="passes over dev.tsv per checkpoint")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    time_training(args, args.variants.split(","))
    if args.checkpoints:
        time_inference(args)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
