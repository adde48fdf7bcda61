"""The reference row: a plain Hugging Face `Trainer` fine-tuning the same model on the same CoLA files.

    python benchmarks/hf_trainer.py --model PATH --data_dir ../shared/data/cola [--padding max_length]

Prints a JSON line: training samples/s (the Trainer's own train_samples_per_second, validation
included, as train.py's metrics.json reports it) and the best validation MCC over the epochs.
"""

import argparse
import json
import tempfile
from pathlib import Path

import datasets
import numpy as np
from sklearn.metrics import matthews_corrcoef
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from data import SPLIT_FILES, read_glue_tsv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory or Hub id")
    parser.add_argument("--data_dir", required=True, help="folder with GLUE-layout train.tsv and dev.tsv")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max_steps", type=int, default=-1, help="stop after this many steps (timing runs)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-5)
    parser.add_argument("--padding", choices=["dynamic", "max_length"], default="dynamic",
                        help="max_length pads every sentence to 128 tokens, as run_glue.py does by default")
    parser.add_argument("--sampling", choices=["random", "group_by_length"], default="random")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    padding = "max_length" if args.padding == "max_length" else False

    def load(split: str) -> datasets.Dataset:
        rows = list(read_glue_tsv(Path(args.data_dir) / SPLIT_FILES[split]))
        dataset = datasets.Dataset.from_list(rows)
        return dataset.map(
            lambda b: tokenizer(b["sentence"], padding=padding, max_length=128, truncation=True),
            batched=True,
            remove_columns=["sentence"],
        )

    def compute_metrics(eval_pred) -> dict:
        logits, labels = eval_pred
        return {"mcc": matthews_corrcoef(labels, np.argmax(logits, axis=-1))}

    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            weight_decay=0.01,
            warmup_steps=0.1,  # a float below 1 is a ratio of all steps in transformers 5
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            eval_strategy="epoch" if args.max_steps < 0 else "no",
            save_strategy="no",
            logging_strategy="epoch",
            train_sampling_strategy=args.sampling,
            report_to="none",
            seed=args.seed,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=load("train"),
            eval_dataset=load("validation"),
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_metrics,
        )
        result = trainer.train()
    mccs = [log["eval_mcc"] for log in trainer.state.log_history if "eval_mcc" in log]
    print(json.dumps({
        "runner": "hf_trainer",
        "padding": args.padding,
        "sampling": args.sampling,
        "learning_rate": args.learning_rate,
        "epochs": args.epochs,
        "train_samples_per_second": result.metrics["train_samples_per_second"],
        "train_runtime_s": result.metrics["train_runtime"],
        "val_mcc_per_epoch": mccs,
        "best_val_mcc": max(mccs) if mccs else None,
    }))


if __name__ == "__main__":
    main()
