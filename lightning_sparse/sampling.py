"""Training order that a checkpoint can resume at any step, bitwise.

Three pieces, used by every DataModule in :mod:`lightning_sparse.data`:

- :class:`EpochSampler` shuffles with a permutation that depends only on ``(seed, epoch)``, shards it
  across DDP ranks itself (it is a ``DistributedSampler``, so Lightning leaves it in place), and hands every
  index its own seed, so augmentation is a function of ``(seed, epoch, position)`` too;
- :class:`SeededItems` runs a dataset's ``__getitem__`` under that per-item seed (torchvision transforms
  draw from the global torch RNG, which Lightning does not checkpoint and which differs per worker);
- :class:`ResumableDataLoader` is a ``DataLoader`` with ``state_dict``/``load_state_dict``: Lightning stores
  its state (epoch and batches consumed) in the checkpoint's loop state and restores it on resume, and the
  next epoch it serves continues at that batch. Any ``num_workers`` gives the same batches.
- :class:`ResumableDataModule` also keeps that state in the DataModule's own checkpoint entry. Lightning
  restores the loop's loader state only when it builds the train loader after the restore; a
  ``configure_optimizers`` that reads ``trainer.estimated_stepping_batches`` (any per-step LR schedule)
  builds it earlier, and the position would be lost. The DataModule's state is restored before that.

Why not torchdata's ``StatefulDataLoader``: Lightning builds the train iterator before it calls
``set_epoch`` on a resumed run, and a multi-worker iterator draws its first indices at construction, so a
stateful loader still needs the epoch-aware, lazily started order below; with that order, the only state
left is two integers, and no extra dependency is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

__all__ = ["EpochSampler", "ResumableDataLoader", "ResumableDataModule", "SeededItems", "IndexOnly"]


class EpochSampler(DistributedSampler):
    """Yields ``(index, item_seed)``; the order is a function of ``(seed, epoch)`` only.

    Args:
        n: dataset length.
        seed: run seed (the CLI passes ``seed_everything``'s value).
        num_replicas: DDP world size; each rank gets every ``num_replicas``-th position of the padded
            permutation, as ``DistributedSampler`` does.
        rank: this process's global rank.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if n < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EpochSampler needs n >= 1 and 0 <= rank < num_replicas, got n={n}, "
                             f"rank={rank}, num_replicas={num_replicas}.")
        # DistributedSampler.__init__ wants a dataset and a process group; set its attributes directly.
        self.n, self.seed, self.epoch = n, seed, 0
        self.num_replicas, self.rank, self.shuffle, self.drop_last = num_replicas, rank, True, False
        self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._resume: tuple[int, int] | None = None  # (epoch, first position) for the next __iter__

    @override
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        """Make the next iteration of ``epoch`` start at ``position`` (in this rank's samples).

        A pending position for another epoch is dropped when that epoch is not the one iterated next
        (a checkpoint taken at the end of an epoch resumes at the start of the following one).
        """
        self._resume = (epoch, position)

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's full ``(index, item_seed)`` list for ``epoch``."""
        base = (self.seed * 100_003 + epoch) * 1_000_003
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(base)).tolist()
        perm += perm[: self.total_size - self.n]  # pad so every rank gets the same count
        return [(i, base + k) for k, i in enumerate(perm)][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = 0
        if self._resume is not None:
            epoch, position = self._resume
            self._resume = None
            start = position if epoch == self.epoch else 0
        return iter(self.order(self.epoch)[start:])


class SeededItems(Dataset):
    """``dataset[i]`` computed under ``torch.manual_seed(item_seed)`` for keys ``(i, item_seed)``.

    The global RNG is restored afterwards, so the training process's own random stream is untouched.
    A plain ``int`` key reads the dataset as it is (evaluation).
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.base[key]
        index, item_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            return self.base[index]


class IndexOnly(Dataset):
    """``dataset[i]`` for keys ``(i, item_seed)``: for datasets without random augmentation."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        return self.base[key[0] if isinstance(key, tuple) else key]


class _CountingIterator(Iterator):
    """Starts the DataLoader iterator at the first ``next`` (after Lightning's ``set_epoch``) and counts
    the batches it hands out."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator | None = None
        self.epoch, self.first, self.served = 0, 0, 0

    def __iter__(self) -> _CountingIterator:
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __next__(self) -> Any:
        if self.iterator is None:
            sampler = self.loader.sampler
            self.epoch = sampler.epoch
            pending = sampler._resume
            self.first = pending[1] // self.loader.batch_size if pending and pending[0] == self.epoch else 0
            self.iterator = DataLoader.__iter__(self.loader)
            self.loader._current = self
        batch = next(self.iterator)
        self.served += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose position Lightning saves and restores.

    ``state_dict()`` is ``{"epoch": e, "batches": k}``: ``k`` batches of epoch ``e`` were handed to the
    training loop. ``load_state_dict`` makes the next iteration of epoch ``e`` start at batch ``k``; if the
    loop moves on to epoch ``e + 1`` instead (the checkpoint was taken at the end of ``e``), it starts at 0.
    Exact resume assumes the same batch size and number of devices as the saved run.
    """

    def __iter__(self) -> Iterator:
        if not isinstance(self.sampler, EpochSampler):  # e.g. Lightning's overfit_batches sampler
            return super().__iter__()
        return _CountingIterator(self)

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, EpochSampler):
            return {}
        current: _CountingIterator | None = getattr(self, "_current", None)
        if current is not None:
            return {"epoch": current.epoch, "batches": current.first + current.served}
        pending = self.sampler._resume
        if pending is not None:
            return {"epoch": pending[0], "batches": pending[1] // self.batch_size}
        return {"epoch": self.sampler.epoch, "batches": 0}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not state_dict or not isinstance(self.sampler, EpochSampler):
            return
        self._current = None
        self.sampler.resume_at(int(state_dict["epoch"]), int(state_dict["batches"]) * self.batch_size)


class ResumableDataModule(pl.LightningDataModule):
    """A DataModule whose train loader (from :meth:`resumable_train_loader`) resumes at the saved batch.

    ``state_dict()`` holds the current train loader's position; ``load_state_dict`` (Lightning calls it
    before ``configure_optimizers``) hands it to the next train loader built.
    """

    _train_loader: ResumableDataLoader | None = None
    _pending_train_state: dict[str, int] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_train_state = state_dict.get("train_loader")

    @override
    def predict_dataloader(self) -> Any:
        """``predict`` runs over the test split (``train.py predict`` returns its logits)."""
        return self.test_dataloader()

    def resumable_train_loader(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                               drop_last: bool = False) -> ResumableDataLoader:
        """A shuffled (:class:`EpochSampler`, sharded over the trainer's DDP ranks), resumable train loader
        over ``dataset``, which is indexed with ``(index, item_seed)`` keys."""
        trainer = getattr(self, "trainer", None)
        shard = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = EpochSampler(len(dataset), seed, num_replicas=shard.get("num_replicas", 1), rank=shard.get("rank", 0))
        loader = ResumableDataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        )
        if self._pending_train_state:
            loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None
        self._train_loader = loader
        return loader
