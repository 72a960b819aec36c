import pytest
import torch

from lightning_sparse.data import CIFARDataModule, DigitsDataModule, FakeDataModule, ImageFolderDataModule


def test_digits_shapes_and_split_sizes():
    dm = DigitsDataModule(image_size=32, batch_size=16)
    dm.setup("fit")
    n_train, n_val, n_test = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert n_train + n_val + n_test == 1797
    assert (n_val, n_test) == (int(1797 * 0.15), int(1797 * 0.15))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and y.dtype == torch.long
    assert set(torch.cat([b[1] for b in dm.test_dataloader()]).tolist()) == set(range(10))
    # normalised with the training split's statistics
    xs = dm.val_set.tensors[0]
    assert abs(xs.mean().item()) < 0.2 and 0.8 < xs.std().item() < 1.2


def test_digits_split_is_deterministic_and_disjoint():
    a, b = DigitsDataModule(max_shift=0), DigitsDataModule(max_shift=0)
    a.setup(), b.setup()
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    c = DigitsDataModule(split_seed=1)
    c.setup()
    assert not torch.equal(a.test_set.tensors[1], c.test_set.tensors[1])
    # no test image appears in the training set
    train = a.train_set.base.tensors[0].flatten(1)
    test = a.test_set.tensors[0].flatten(1)
    assert torch.cdist(test, train).min() > 0


def test_digits_shift_augment_changes_images_but_not_labels():
    dm = DigitsDataModule(max_shift=2)
    dm.setup()
    torch.manual_seed(0)
    xs = [dm.train_set[0][0] for _ in range(8)]
    assert any(not torch.equal(xs[0], x) for x in xs[1:])
    assert xs[0].shape == (1, 32, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size must be >= 1, got image_size=0"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction=0.6, test_fraction=0.5"),
        ({"max_shift": -1}, "max_shift=-1"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_cifar_missing_dir_names_path_and_layout(tmp_path):
    dm = CIFARDataModule(data_dir=str(tmp_path / "nope"), num_classes=100)
    with pytest.raises(FileNotFoundError, match=r"nope/cifar-100-python.*Nothing is downloaded"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="num_classes must be 10 or 100 for CIFAR, got num_classes=20"):
        CIFARDataModule(data_dir=str(tmp_path), num_classes=20)


def test_imagefolder_missing_dir_names_path_and_layout(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    dm = ImageFolderDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"missing \[.*val'\].*<data_dir>/train/<class>"):
        dm.setup("fit")


def test_imagefolder_reads_local_images(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), color=(i * 100, 20, 30)).save(d / f"{i}.png")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), image_size=24, batch_size=2, num_workers=0)
    assert dm.num_classes == 2
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 24, 24)


def test_fake_data_is_seeded():
    dm = FakeDataModule(num_samples=8, image_size=16, batch_size=4)
    a = next(iter(dm.val_dataloader()))[0]
    b = next(iter(dm.val_dataloader()))[0]
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b)


def test_digits_training_order_depends_only_on_seed_and_epoch():
    dm = DigitsDataModule(image_size=8, batch_size=8)
    dm.setup()

    def first_batch(epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    torch.manual_seed(123)
    a = first_batch(1)
    torch.manual_seed(999)  # the global RNG plays no part: resumed runs see the same batches
    b = first_batch(1)
    c = first_batch(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_predict_runs_over_the_test_split():
    dm = DigitsDataModule(image_size=8, batch_size=32)
    dm.setup()
    pred = torch.cat([x for x, _ in dm.predict_dataloader()])
    test = torch.cat([x for x, _ in dm.test_dataloader()])
    assert torch.equal(pred, test) and len(pred) == len(dm.test_dataloader().dataset)
