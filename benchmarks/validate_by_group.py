"""Validate a trained checkpoint again with --data.group_column: its metrics overall, on the validation examples whose
group (CoLA's source) occurs in the training data, and on the others. For runs trained without the option.

    python benchmarks/validate_by_group.py logs/teacher/version_0/checkpoints/best-epoch=2-val_mcc=0.5612.ckpt source
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from pytorch_lightning import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import TextDataModule  # noqa: E402
from model import TextClassifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a best checkpoint of train.py")
    parser.add_argument("group_column", help="the column that groups the examples (CoLA's GLUE files: source)")
    args = parser.parse_args()
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    options = {k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    options.update(group_column=args.group_column, teacher=None, perturbed_copies=0, unlabelled_file=None)  # no teacher to validate
    model = TextClassifier.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=True)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, datamodule=TextDataModule(**options), verbose=False)[0]
    print(json.dumps({"checkpoint": args.checkpoint, **{k: round(float(v), 4) for k, v in sorted(metrics.items())}}))


if __name__ == "__main__":
    main()
