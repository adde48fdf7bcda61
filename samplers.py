"""How training batches are drawn and padded: a random order that depends only on (seed, epoch), batches of
similar lengths, a DataLoader that resumes mid-epoch, and padding to a few lengths for a compiled model."""

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding
from transformers.data.data_collator import pad_without_fast_tokenizer_warning


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
    Lightning 2.6 when configure_optimizers reads trainer.estimated_stepping_batches, as TextClassifier's does:
    that sets up the training DataLoader before the checkpoint is restored, and it is never set up again.)
    """

    def __init__(self, *args, batches_done: Callable[[], int] = lambda: 0, **kwargs) -> None:
        # Its own generator (which only seeds worker processes): iterating must not draw from the global one,
        # whose state a checkpoint saves and restores for dropout (see TextClassifier.on_save_checkpoint).
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
