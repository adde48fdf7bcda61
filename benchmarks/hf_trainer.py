"""The reference: a plain Hugging Face `Trainer` fine-tuning the same model on the same CoLA files.

    python benchmarks/hf_trainer.py --model PATH --data_dir ../shared/data/cola [--padding max_length]

`reference_trainer()` builds it for every script: speed.py's Trainer rows call it, quality.py --runner hf
runs this command (`make_bert_base()` serves speed.py --make_bert_base). The command prints a JSON line:
training samples/s (the Trainer's own train_samples_per_second, validation included, as train.py's
metrics.json reports it) and the best validation MCC over the epochs.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from sklearn.metrics import matthews_corrcoef
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # data.py, when run as a script
from readers import SPLIT_FILES, read_glue_tsv  # noqa: E402

MAX_LENGTH = 128  # as train.py's --data.max_length and run_glue.py's --max_seq_length


def load_split(
    tokenizer: PreTrainedTokenizerBase, data_dir: str | Path, split: str, padding: str = "dynamic"
) -> datasets.Dataset:
    """One split ("train" or "validation") of local GLUE CoLA files, tokenized and truncated to 128 tokens.

    padding "dynamic" leaves padding to the collator (per batch); "max_length" pads every sentence to 128
    tokens here, as run_glue.py does by default.
    """
    rows = list(read_glue_tsv(Path(data_dir) / SPLIT_FILES[split]))
    pad_to: str | bool = "max_length" if padding == "max_length" else False
    return datasets.Dataset.from_list(rows).map(
        lambda b: tokenizer(b["sentence"], padding=pad_to, max_length=MAX_LENGTH, truncation=True),
        batched=True,
        remove_columns=["sentence"],
    )


def mcc(prediction: EvalPrediction) -> dict:
    return {"mcc": matthews_corrcoef(prediction.label_ids, np.argmax(prediction.predictions, axis=-1))}


def reference_trainer(
    model: str, data_dir: str | Path, output_dir: str, *, batch_size: int, learning_rate: float, epochs: float,
    max_steps: int, sampling: str, padding: str, seed: int, **overrides: Any,
) -> Trainer:
    """train.py's recipe as a Trainer: AdamW with weight decay 0.01 (none on biases and LayerNorm), linear
    warmup over 10% of the steps then linear decay, padding per batch by DataCollatorWithPadding (unless
    padding="max_length"); validation MCC on dev.tsv when eval_strategy asks; no checkpoints, no trackers.
    overrides: more TrainingArguments."""
    set_seed(seed)  # before the model is built: the classifier head's initial weights follow the seed, as in train.py
    tokenizer = AutoTokenizer.from_pretrained(model)
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=0.01,
        warmup_steps=0.1,  # a float below 1 is a ratio of all steps in transformers 5
        num_train_epochs=epochs,
        max_steps=max_steps,
        save_strategy="no",
        train_sampling_strategy=sampling,
        report_to="none",
        seed=seed,
        **overrides,
    )
    return Trainer(
        model=AutoModelForSequenceClassification.from_pretrained(model, num_labels=2),
        args=args,
        train_dataset=load_split(tokenizer, data_dir, "train", padding),
        eval_dataset=load_split(tokenizer, data_dir, "validation", padding),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=mcc,
    )


def make_bert_base(directory: str, vocab_from: str, seed: int, **size: int) -> None:
    """A BERT-base-sized classifier with random weights, and vocab_from's tokenizer, saved in directory: a model
    for every speed.py row (and for train.py's --model.model_name_or_path) without a download. size: BertConfig
    fields to change (gpu_check.sh --dry-run makes a tiny one)."""
    tokenizer = AutoTokenizer.from_pretrained(vocab_from)
    set_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=2, **size)
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"BERT ({model.num_parameters() / 1e6:.1f}M parameters, random weights) and the tokenizer of "
          f"{vocab_from} saved in {directory}")


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

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = reference_trainer(
            args.model, args.data_dir, output_dir, batch_size=args.batch_size, learning_rate=args.learning_rate,
            epochs=args.epochs, max_steps=args.max_steps, sampling=args.sampling, padding=args.padding,
            seed=args.seed, eval_strategy="epoch" if args.max_steps < 0 else "no", logging_strategy="epoch",
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
