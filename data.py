"""CoLA as a LightningDataModule: the Hugging Face Hub by default, or local GLUE-layout TSV files."""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import datasets
import torch
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Sampler
from transformers import AutoConfig, AutoTokenizer, DataCollatorWithPadding
from transformers.data.data_collator import pad_without_fast_tokenizer_warning

from hub import explain_hub_errors, load_glue_cola

SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}  # GLUE names the validation file dev.tsv
LABEL_NAMES = ("unacceptable", "acceptable")  # CoLA's label 0 and 1
MODEL_INPUTS = ["input_ids", "token_type_ids", "attention_mask", "labels"]


class DataError(ValueError):
    """A problem in the user's data, reported as one line: 'file:line: what is wrong'."""


class OptionError(ValueError):
    """An option value that cannot work, reported as one line naming the option and what it accepts."""


def read_glue_tsv(path: Path) -> Iterator[dict]:
    """Yield {"sentence", "label"} rows of a GLUE CoLA file (source, label, star, sentence; no header).

    Parsed by hand rather than as CSV: CoLA sentences contain quote characters that a CSV reader
    would take as quoting. Blank lines at the end (editors add one) are ignored. Any other malformed
    line, blank ones included, or a file without sentences raises DataError naming the file and line.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    rows, first_blank = 0, None
    with f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                first_blank = first_blank or line_no  # an error only if a sentence follows
                continue
            if first_blank:
                raise DataError(f"{path}:{first_blank}: blank line (only the end of the file may have blank lines)")
            columns = line.split("\t")
            if len(columns) != 4:
                raise DataError(
                    f"{where}: expected 4 tab-separated columns (source, label, star, sentence), found {len(columns)}"
                )
            _, label, _, sentence = columns
            if label not in ("0", "1"):
                raise DataError(f"{where}: label must be 0 or 1, found {label!r}")
            if not sentence.strip():
                raise DataError(f"{where}: empty sentence")
            rows += 1
            yield {"sentence": sentence, "label": int(label)}
    if rows == 0:
        raise DataError(f"{path}: empty file (no sentences)")


def _file_digest(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def load_local_cola(data_dir: Path, split: str) -> datasets.Dataset:
    """One split of a local GLUE CoLA folder as an Arrow dataset, cached by the file's content hash."""
    path = Path(data_dir) / SPLIT_FILES[split]
    try:
        found = path.is_file()
    except OSError as e:  # a folder that may not be listed: is_file() raises rather than say False
        raise DataError(f"{path}: cannot read ({e.strerror}): check the permissions of --data.data_dir") from None
    if not found:
        raise DataError(f"{path}: file not found (data_dir must hold GLUE CoLA's train.tsv and dev.tsv)")
    try:
        return datasets.Dataset.from_generator(
            read_glue_tsv,
            gen_kwargs={"path": path},
            features=datasets.Features({"sentence": datasets.Value("string"), "label": datasets.Value("int64")}),
            fingerprint=f"cola-{split}-{_file_digest(path)}",
        )
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise


class ShuffleSampler(Sampler[int]):
    """A uniformly random order of n items that depends only on (seed, epoch).

    A resumed run must see the interrupted epoch's batches in the same order, so the order cannot come from a
    generator that carries state from epoch to epoch. Lightning calls set_epoch() before every epoch (under
    DDP through its DistributedSamplerWrapper, which then deals the indices out to the processes).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)  # as torch's DistributedSampler seeds

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=self._generator()).tolist()


class LengthGroupedSampler(ShuffleSampler):
    """Random batches of sentences of similar length, so that dynamic padding adds few pad tokens.

    Each epoch: shuffle all sentences, sort each window of 50 groups by length, cut it into groups,
    shuffle the groups. A group is one batch per DDP process: Lightning deals a custom sampler's indices
    out round-robin, so every process gets its share of the same group.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int) -> None:
        super().__init__(len(lengths), seed)  # same seed on every DDP process: same order
        self.lengths, self.group_size = lengths, group_size

    def __iter__(self) -> Iterator[int]:
        generator = self._generator()
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = 50 * self.group_size
        groups = []
        for start in range(0, len(order), window):
            by_length = sorted(order[start : start + window], key=self.lengths.__getitem__)
            groups += [by_length[i : i + self.group_size] for i in range(0, len(by_length), self.group_size)]
        # A short group stays last: in the middle it would shift every later batch off its group.
        last = [groups.pop()] if len(groups[-1]) < self.group_size else []
        for group in [groups[i] for i in torch.randperm(len(groups), generator=generator)] + last:
            yield from group


class ResumableDataLoader(DataLoader):
    """A DataLoader that, in a run resumed mid-epoch, starts at the batch where the interrupted run stopped.

    batches_done() says how many batches of the current epoch were already trained on; it is asked at the
    epoch's first batch, when Lightning has restored its progress from the checkpoint. The skipped batches
    are loaded and dropped (cheap next to training on them); the sampler must give the same order again
    (ShuffleSampler does). Under DDP Lightning rebuilds this class with its distributed sampler, and each
    process skips as many of its own batches.

    (Lightning's own mechanism, a DataLoader with state_dict()/load_state_dict(), is silently skipped in
    Lightning 2.6 when configure_optimizers reads trainer.estimated_stepping_batches, as ColaModel's does:
    that sets up the training DataLoader before the checkpoint is restored, and it is never set up again.)
    """

    def __init__(self, *args, batches_done: Callable[[], int] = lambda: 0, **kwargs) -> None:
        # Its own generator (which only seeds worker processes): iterating must not draw from the global one,
        # whose state a checkpoint saves and restores for dropout (see ColaModel.on_save_checkpoint).
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def __iter__(self) -> Iterator:
        skip = self.batches_done()  # a generator: this runs at the first next(), not at iter()
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


BUCKET_LENGTHS = (16, 32, 64)  # and max_length: CoLA's sentences are 3-47 tokens, most under 16


@dataclass
class PadToBucket(DataCollatorWithPadding):
    """Pads each batch to the shortest of a few lengths that holds its longest sentence: a compiled model
    (--model.compile) then meets a few shapes, instead of one per batch length, each compiled once."""

    buckets: tuple[int, ...] = ()

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(feature["input_ids"]) for feature in features)
        length = next(bucket for bucket in self.buckets if bucket >= longest)
        return pad_without_fast_tokenizer_warning(
            self.tokenizer, features, padding="max_length", max_length=length, return_tensors="pt"
        )


class ColaDataModule(pl.LightningDataModule):
    """Tokenized CoLA batches with per-batch dynamic padding.

    Args:
        model_name_or_path: whose tokenizer to use (set from --model.model_name_or_path by train.py).
        data_dir: a folder with GLUE-layout train.tsv and dev.tsv; None loads CoLA from the Hub.
        batch_size: sentences per batch (per device under DDP).
        max_length: longer sentences are truncated to this many tokens (CoLA's longest is ~45).
        num_workers: DataLoader worker processes; None: 2 with a GPU (batches collated while the GPU
            computes), 0 without (on a small CPU, workers would compete with the model for cores).
        group_by_length: training batches of similar-length sentences (LengthGroupedSampler) instead
            of uniformly random ones: less padding, faster steps.
        pad_to_buckets: pad batches to 16, 32, 64 or max_length tokens (PadToBucket) instead of to their longest
            sentence; set by train.py from --model.compile.
    """

    def __init__(
        self,
        model_name_or_path: str = "google-bert/bert-base-uncased",
        data_dir: Optional[str] = None,
        batch_size: int = 32,
        max_length: int = 128,
        num_workers: Optional[int] = None,
        group_by_length: bool = True,
        pad_to_buckets: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise OptionError(f"--data.batch_size must be at least 1, not {batch_size}")
        if max_length < 3:  # [CLS], one token, [SEP]
            raise OptionError(f"--data.max_length must be at least 3 ([CLS], one token, [SEP]), not {max_length}")
        if num_workers is not None and num_workers < 0:
            raise OptionError(f"--data.num_workers must be 0 or more (0: load batches in the training process), not {num_workers}")
        self.save_hyperparameters()
        self.tokenizer = None
        self.splits: dict[str, datasets.Dataset] = {}

    def _load_split(self, split: str) -> datasets.Dataset:
        if self.hparams.data_dir:
            return load_local_cola(Path(self.hparams.data_dir), split)
        return load_glue_cola(split)

    def _load_tokenizer(self):
        with explain_hub_errors("tokenizer", self.hparams.model_name_or_path):
            return AutoTokenizer.from_pretrained(self.hparams.model_name_or_path)

    def prepare_data(self) -> None:
        # Runs on one process: fill the caches (Hub download, Arrow files, tokenizer), keep no state.
        self._load_tokenizer()
        for split in SPLIT_FILES:
            self._load_split(split)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        self.tokenizer = self._load_tokenizer()
        for split in SPLIT_FILES:
            self.splits[split] = self._tokenize(self._load_split(split), split)

    def _model_max_length(self) -> int:
        """The longest input the model takes: its tokenizer's model_max_length, and its position embeddings
        (a tokenizer saved without model_max_length allows any length, and a longer input crashes the model)."""
        with explain_hub_errors("model", self.hparams.model_name_or_path):
            config = AutoConfig.from_pretrained(self.hparams.model_name_or_path)
        positions = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        return min(self.tokenizer.model_max_length, positions)

    def _tokenize(self, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        max_length = min(self.hparams.max_length, self._model_max_length())

        def encode(batch: dict) -> dict:
            encoded = self.tokenizer(batch["sentence"], truncation=True, max_length=max_length)
            # A second, untruncated pass only counts what truncation cut; map caches both.
            full_lengths = [len(ids) for ids in self.tokenizer(batch["sentence"])["input_ids"]]
            encoded["truncated"] = [n > max_length for n in full_lengths]
            return encoded

        dataset = dataset.map(encode, batched=True, desc=f"Tokenizing {split}")
        truncated = sum(dataset["truncated"])
        if truncated:
            print(f"{split}: {truncated} of {len(dataset)} sentences truncated to max_length={max_length} tokens")
        dataset = dataset.rename_column("label", "labels")
        return dataset.select_columns([c for c in MODEL_INPUTS if c in dataset.column_names])

    def _loader(self, split: str, sampler: Optional[Sampler] = None, loader_class: type = DataLoader, **kwargs) -> DataLoader:
        gpu = torch.cuda.is_available()
        workers = self.hparams.num_workers if self.hparams.num_workers is not None else 2 * gpu
        if self.hparams.pad_to_buckets:
            max_length = min(self.hparams.max_length, self.tokenizer.model_max_length)
            collate = PadToBucket(self.tokenizer, buckets=(*(b for b in BUCKET_LENGTHS if b < max_length), max_length))
        else:  # multiples of 8 tokens keep matrix shapes aligned to the GPU's tensor cores (TF32 and bf16)
            collate = DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=8 if gpu else None)
        return loader_class(
            self.splits[split],
            **kwargs,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=gpu,
        )

    def train_dataloader(self) -> DataLoader:
        seed = torch.initial_seed()  # seed_everything's seed, the same on every DDP process
        if self.hparams.group_by_length:
            lengths = [len(ids) for ids in self.splits["train"]["input_ids"]]
            world_size = self.trainer.world_size if self.trainer else 1
            sampler = LengthGroupedSampler(lengths, self.hparams.batch_size * world_size, seed)
        else:
            sampler = ShuffleSampler(len(self.splits["train"]), seed)
        return self._loader("train", sampler, ResumableDataLoader, batches_done=self._batches_done_this_epoch)

    def _batches_done_this_epoch(self) -> int:
        # Training batches of the current epoch that Lightning counts as done: those of the interrupted
        # run when resuming from a checkpoint saved mid-epoch, 0 at every epoch's start.
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer else 0

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")
