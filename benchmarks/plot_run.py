"""The README's picture: train_loss and val_mcc of one run, read from its TensorBoard logs.

    python benchmarks/plot_run.py logs/cola/version_0 docs/val_mcc.png --title "all-MiniLM-L6-v2, ..."
"""

import argparse

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder, e.g. logs/cola/version_0")
    parser.add_argument("png", help="where to write the picture")
    parser.add_argument("--title", default="", help="a line above both plots")
    args = parser.parse_args()
    events = EventAccumulator(args.run_dir, size_guidance={"scalars": 0}).Reload()  # 0: every point, not a sample

    figure, (loss, mcc) = plt.subplots(1, 2, figsize=(8, 2.7))
    steps, values = zip(*[(e.step, e.value) for e in events.Scalars("train_loss")])
    loss.plot(steps, values, color="grey", linewidth=0.8)
    loss.set_title("train_loss")
    steps, values = zip(*[(e.step, e.value) for e in events.Scalars("val_mcc")])
    mcc.plot(steps, values, color="tab:red", marker="o", label="all")
    mcc.set_title("val_mcc (CoLA's metric)")
    for part, style in (("seen", "--"), ("unseen", ":")):  # a run with --data.group_column
        if f"val_{part}_mcc" in events.Tags()["scalars"]:
            steps, values = zip(*[(e.step, e.value) for e in events.Scalars(f"val_{part}_mcc")])
            mcc.plot(steps, values, color="tab:red", linestyle=style, marker=".", label=f"{part} sources")
            mcc.legend(fontsize=7, frameon=False)
    for axes in (loss, mcc):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.spines[["top", "right"]].set_visible(False)
    figure.suptitle(args.title, fontsize=9)
    figure.tight_layout()
    figure.savefig(args.png, dpi=100)


if __name__ == "__main__":
    main()
