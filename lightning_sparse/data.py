"""DataModules. Each exposes ``num_classes``, ``in_chans`` and ``image_size`` so the CLI can link
them into the model, and ``preprocessing()``: what a deployed model must do to a raw image to see what
training saw (the export records it). Nothing is downloaded: Digits ships inside scikit-learn, everything
else is read from a local directory and a missing directory is an error that names it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override

from lightning_sparse.sampling import EpochSampler, IndexOnly, ResumableDataModule, SeededItems

__all__ = ["DigitsDataModule", "CIFARDataModule", "ImageFolderDataModule", "FakeDataModule", "EpochSampler"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _preprocessing(source: str, input_size: tuple[int, int, int], channel_order: str, scale: float | None,
                   resize: int | None, interpolation: str | None, crop: int | None,
                   mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """The evaluation preprocessing of a DataModule, as plain values (JSON- and ``weights_only``-safe).

    A raw image is turned into the model's input by: channels in ``channel_order``; pixel values divided by
    ``scale``; resized (``interpolation``) so its shorter side is ``resize``; centre-cropped to ``crop``;
    then ``(x - mean) / std`` per channel. ``None`` means the step does not happen.
    """
    return {"source": source, "input_size": list(input_size), "channel_order": channel_order, "scale": scale,
            "resize": resize, "interpolation": interpolation, "crop": crop,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {name}={v}.")


def _train_seed(default: int = 0) -> int:
    """The run's ``seed_everything`` value (Lightning exports it), else ``default``."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


class _ShiftAugment(Dataset):
    """Random translation by up to ``max_shift`` pixels (zero padding), applied on tensors.

    Indexed by ``(index, item_seed)`` (from :class:`EpochSampler`) the shift is drawn from ``item_seed``;
    indexed by a plain int it uses the global RNG.
    """

    def __init__(self, base: TensorDataset, max_shift: int) -> None:
        self.base, self.max_shift = base, max_shift

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, item_seed = key if isinstance(key, tuple) else (key, None)
        x, y = self.base[i]
        if self.max_shift:
            s = self.max_shift
            gen = torch.Generator().manual_seed(item_seed) if item_seed is not None else None
            dx, dy = torch.randint(-s, s + 1, (2,), generator=gen).tolist()
            x = torch.roll(F.pad(x, (s, s, s, s)), shifts=(dy, dx), dims=(1, 2))[:, s:-s, s:-s]
        return x, y


class DigitsDataModule(ResumableDataModule):
    """scikit-learn's ``load_digits``: 1,797 real 8×8 handwritten digits, 10 classes, 1 channel.

    Embedded default dataset: no download. Images are upsampled to ``image_size`` (bilinear) and
    normalised with the training split's mean/std. The train/val/test split is fixed by ``split_seed``.

    Args:
        image_size: output resolution (default 32).
        batch_size: batch size for every split.
        val_fraction: fraction of the images used for validation.
        test_fraction: fraction of the images used for testing.
        split_seed: seed of the split permutation (independent of the training seed).
        max_shift: random-translation augmentation in pixels at ``image_size`` (0 disables).
        num_workers: DataLoader workers.
    """

    num_classes = 10
    in_chans = 1

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        max_shift: int = 2,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_positive(image_size=image_size, batch_size=batch_size)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                "val_fraction and test_fraction must be in (0, 1) with a sum < 1, got "
                f"val_fraction={val_fraction}, test_fraction={test_fraction}."
            )
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got max_shift={max_shift}.")
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.max_shift = max_shift
        self.train_set: Dataset | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        if self.image_size != x.shape[-1]:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_val, n_test = int(len(x) * self.val_fraction), int(len(x) * self.test_fraction)
        test_idx, val_idx, train_idx = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
        mean, std = x[train_idx].mean(), x[train_idx].std()
        self.mean, self.std = float(mean), float(std)  # preprocessing() records them
        x = (x - mean) / std
        self.train_set = _ShiftAugment(TensorDataset(x[train_idx], y[train_idx]), self.max_shift)
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])

    def preprocessing(self) -> dict[str, Any]:
        """Raw ``load_digits`` image (8x8, values 0..16) -> model input: ``/ 16``, bilinear resize
        (``align_corners=False``) to ``image_size``, ``(x - mean) / std`` with the training split's statistics
        (computed here by :meth:`setup`).

        Example:
            >>> p = DigitsDataModule(image_size=16).preprocessing()
            >>> p["input_size"], p["scale"], p["interpolation"], len(p["mean"])
            ([1, 16, 16], 16.0, 'bilinear', 1)
        """
        self.setup()
        size = self.image_size
        resized = size != 8
        return _preprocessing("lightning_sparse.data.DigitsDataModule", (1, size, size), "gray", 16.0,
                              size if resized else None, "bilinear" if resized else None, None,
                              (self.mean,), (self.std,))

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self.resumable_train_loader(self.train_set, self.batch_size, _train_seed(self.split_seed), self.num_workers)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class _ImageDataModule(ResumableDataModule):
    """Shared loader plumbing for the directory-backed DataModules."""

    def check_data_dir(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @override
    def prepare_data(self) -> None:
        self.check_data_dir()

    def __init__(self, data_dir: str, batch_size: int, num_workers: int) -> None:
        super().__init__()
        _check_positive(batch_size=batch_size)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got num_workers={num_workers}.")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size, self.num_workers = batch_size, num_workers

    def _loader(self, ds: Dataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self.resumable_train_loader(SeededItems(self.train_set), self.batch_size, _train_seed(), self.num_workers,
                                           drop_last=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class CIFARDataModule(_ImageDataModule):
    """CIFAR-10/100 from a local directory (``download=False``), standard crop+flip augmentation.

    Expected layout: ``<data_dir>/cifar-10-batches-py/`` or ``<data_dir>/cifar-100-python/`` (the
    python version of the archives from the CIFAR website, extracted). The test split serves as
    validation and test set, as is customary for CIFAR.

    Args:
        data_dir: directory holding the extracted archive.
        num_classes: 10 or 100.
        batch_size: batch size.
        num_workers: DataLoader workers.
    """

    in_chans = 3
    image_size = 32
    _FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}

    def __init__(
        self, data_dir: str = "data/cifar", num_classes: int = 10, batch_size: int = 128, num_workers: int = 4
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers)
        if num_classes not in self._FOLDERS:
            raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got num_classes={num_classes}.")
        self.num_classes = num_classes
        self.train_set: Dataset | None = None

    @override
    def check_data_dir(self) -> None:
        """Raise ``FileNotFoundError`` naming the directory and the expected layout if data is missing."""
        folder = self.data_dir / self._FOLDERS[self.num_classes]
        if not folder.is_dir():
            raise FileNotFoundError(
                f"CIFAR-{self.num_classes} not found: expected the extracted python archive at {str(folder)!r} "
                f"(data_dir={str(self.data_dir)!r}). Nothing is downloaded; extract "
                f"cifar-{self.num_classes}-python.tar.gz into data_dir."
            )

    def preprocessing(self) -> dict[str, Any]:
        """RGB 32x32 image -> model input: ``/ 255`` (``ToTensor``), then the CIFAR mean/std (no resize)."""
        mean, std = CIFAR_STATS[self.num_classes]
        return _preprocessing(f"lightning_sparse.data.CIFARDataModule (CIFAR-{self.num_classes})", (3, 32, 32),
                              "RGB", 255.0, None, None, None, mean, std)

    @override
    def setup(self, stage: str | None = None) -> None:
        self.check_data_dir()
        if self.train_set is not None:
            return
        from torchvision import datasets
        from torchvision import transforms as T

        mean, std = CIFAR_STATS[self.num_classes]
        norm = [T.ToTensor(), T.Normalize(mean, std)]
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm])
        cls = datasets.CIFAR10 if self.num_classes == 10 else datasets.CIFAR100
        self.train_set = cls(str(self.data_dir), train=True, transform=train_tf, download=False)
        self.val_set = cls(str(self.data_dir), train=False, transform=T.Compose(norm), download=False)


class ImageFolderDataModule(_ImageDataModule):
    """ImageNet-style folders: ``<data_dir>/train/<class>/*`` and ``<data_dir>/val/<class>/*``.

    Standard augmentation: RandomResizedCrop + horizontal flip for training; resize to
    ``image_size / 0.875`` and centre crop for evaluation. ``val/`` also serves as the test split.

    Args:
        data_dir: root holding ``train/`` and ``val/``.
        image_size: crop size (224 for ImageNet).
        batch_size: batch size per device.
        num_workers: DataLoader workers.
    """

    in_chans = 3

    def __init__(
        self, data_dir: str = "data/imagenet", image_size: int = 224, batch_size: int = 128, num_workers: int = 8
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers)
        _check_positive(image_size=image_size)
        self.image_size = image_size
        self.train_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of class folders under ``train/`` (needs the data directory)."""
        self.check_data_dir()
        return sum(1 for p in (self.data_dir / "train").iterdir() if p.is_dir())

    @override
    def check_data_dir(self) -> None:
        """Raise ``FileNotFoundError`` naming the directory and the expected layout if data is missing."""
        missing = [str(self.data_dir / s) for s in ("train", "val") if not (self.data_dir / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"ImageFolder data not found: missing {missing} (data_dir={str(self.data_dir)!r}). "
                "Expected <data_dir>/train/<class>/<image> and <data_dir>/val/<class>/<image>."
            )

    def _resize(self) -> int:
        return int(round(self.image_size / 0.875))

    def preprocessing(self) -> dict[str, Any]:
        """RGB image -> model input (evaluation): ``/ 255`` (``ToTensor``), bilinear resize of the shorter side
        to ``image_size / 0.875``, centre crop to ``image_size``, then the ImageNet mean/std."""
        size = self.image_size
        return _preprocessing("lightning_sparse.data.ImageFolderDataModule", (3, size, size), "RGB", 255.0,
                              self._resize(), "bilinear", size, IMAGENET_MEAN, IMAGENET_STD)

    @override
    def setup(self, stage: str | None = None) -> None:
        self.check_data_dir()
        if self.train_set is not None:
            return
        from torchvision import datasets
        from torchvision import transforms as T

        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        train_tf = T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip(), *norm])
        val_tf = T.Compose([T.Resize(self._resize()), T.CenterCrop(self.image_size), *norm])
        self.train_set = datasets.ImageFolder(str(self.data_dir / "train"), transform=train_tf)
        self.val_set = datasets.ImageFolder(str(self.data_dir / "val"), transform=val_tf)


class FakeDataModule(ResumableDataModule):
    """Random images (fixed seed) for throughput and smoke runs; accuracy is meaningless.

    Args:
        num_samples: images per split.
        num_classes: number of classes.
        image_size: square resolution.
        in_chans: channels.
        batch_size: batch size.
    """

    def __init__(
        self, num_samples: int = 256, num_classes: int = 10, image_size: int = 32, in_chans: int = 3, batch_size: int = 32
    ) -> None:
        super().__init__()
        _check_positive(num_samples=num_samples, num_classes=num_classes, image_size=image_size,
                        in_chans=in_chans, batch_size=batch_size)
        self.num_samples, self.num_classes, self.image_size = num_samples, num_classes, image_size
        self.in_chans, self.batch_size = in_chans, batch_size

    def preprocessing(self) -> dict[str, Any]:
        """The random images are already model inputs (standard normal): nothing to do (mean 0, std 1)."""
        c, size = self.in_chans, self.image_size
        return _preprocessing("lightning_sparse.data.FakeDataModule (random inputs)", (c, size, size),
                              "RGB" if c == 3 else f"{c} channels", None, None, None, None, (0.0,) * c, (1.0,) * c)

    def _loader(self, seed: int, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.num_samples, self.in_chans, self.image_size, self.image_size, generator=g)
        y = torch.randint(0, self.num_classes, (self.num_samples,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=shuffle)

    @override
    def train_dataloader(self) -> DataLoader:
        return self.resumable_train_loader(IndexOnly(self._loader(0, shuffle=False).dataset), self.batch_size, _train_seed())

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(1, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(2, shuffle=False)
