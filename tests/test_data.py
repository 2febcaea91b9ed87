"""The Fashion-MNIST reader: real data (sizes, labels, split) and small generated IDX files (lookup, bad files)."""

import gzip

import numpy as np
import pytest
import torch
from conftest import write_idx, write_split

from fashion_ft import data
from fashion_ft.data import (
    CLASSES,
    FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    find_data_dir,
    read_split,
    stratified_split,
)
from fashion_ft.errors import UserError

# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_train(real_data_dir):
    # reading 60k gzipped images takes seconds: once per module
    return read_split(real_data_dir, "train")


@pytest.fixture(scope="module")
def real_test(real_data_dir):
    return read_split(real_data_dir, "test")


@pytest.mark.parametrize("split, n", [("train", 60_000), ("test", 10_000)])
def test_real_sizes_and_label_histogram(request, split, n):
    images, labels = request.getfixturevalue(f"real_{split}")
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    # Fashion-MNIST is exactly balanced: 6,000 / 1,000 images per class
    assert torch.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    assert 0 < images.float().mean() / 255 < 1  # real pixels, not a zero-filled buffer


def test_default_split_is_exactly_stratified(real_train):
    labels = real_train[1]
    train_idx, val_idx = stratified_split(labels, 5000, seed=0)
    assert torch.bincount(labels[val_idx], minlength=10).tolist() == [500] * 10
    assert len(train_idx) == 55_000


@pytest.mark.parametrize("val_size", [4999, 5001, 7])
def test_odd_split_sizes_stay_balanced(real_train, val_size):
    counts = torch.bincount(real_train[1][stratified_split(real_train[1], val_size, seed=1)[1]], minlength=10)
    assert int(counts.sum()) == val_size
    assert int(counts.max() - counts.min()) <= 1


def test_split_is_disjoint_and_covers_everything(real_train):
    train_idx, val_idx = stratified_split(real_train[1], 5000, seed=0)
    both = torch.cat([train_idx, val_idx])
    assert len(both) == 60_000 and torch.equal(both.sort().values, torch.arange(60_000))


def test_split_is_deterministic_per_seed(real_train):
    labels = real_train[1]
    first, again, other = (stratified_split(labels, 5000, seed=s)[1] for s in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("val_size", [-1, 60_000])
def test_impossible_split_size_is_a_user_error(real_train, val_size):
    with pytest.raises(UserError, match="validation size"):
        stratified_split(real_train[1], val_size, seed=0)


# ---------------------------------------------------------------- small generated IDX files


def tiny_split(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def gzip_folder(folder):
    """Replace every IDX file in `folder` by its .gz version."""
    for path in list(folder.iterdir()):
        (folder / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()


@pytest.mark.parametrize("compressed", [False, True])
def test_reads_raw_and_gz_files(tmp_path, compressed):
    images, labels = tiny_split()
    write_split(tmp_path, "test", images, labels)
    if compressed:
        gzip_folder(tmp_path)
    got_images, got_labels = read_split(tmp_path, "test")
    assert np.array_equal(got_images.numpy(), images)
    assert got_labels.tolist() == labels.tolist()


@pytest.fixture
def every_place(tmp_path, monkeypatch):
    """Each place the reader looks at holds a train split; the working directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    places = {name: tmp_path / sub for name, sub in [
        ("flag", "flag"), ("env", "env"), ("data", "data"), ("raw", "data/FashionMNIST/raw"), ("debian", "debian"),
    ]}
    for folder in places.values():
        write_split(folder, "train", *tiny_split())
    monkeypatch.setenv("FASHION_MNIST_DIR", str(places["env"]))
    monkeypatch.setattr(data, "DEBIAN_DIR", str(places["debian"]))
    return places


def remove_split(folder):
    for stem in FILES["train"]:
        (folder / stem).unlink()


def test_lookup_order(every_place):
    assert find_data_dir(str(every_place["flag"])).resolve() == every_place["flag"]
    # without --data-dir: $FASHION_MNIST_DIR, ./data, data/FashionMNIST/raw, the Debian folder, in that order
    for name, next_name in [("env", "data"), ("data", "raw"), ("raw", "debian")]:
        assert find_data_dir(None).resolve() == every_place[name]
        remove_split(every_place[name])
        assert find_data_dir(None).resolve() == every_place[next_name]
    remove_split(every_place["debian"])
    with pytest.raises(UserError, match="not found"):
        find_data_dir(None)


def test_data_dir_flag_accepts_torchvision_layout(every_place):
    remove_split(every_place["data"])  # left: data/FashionMNIST/raw, where torchvision downloads to
    assert find_data_dir(str(every_place["data"])).resolve() == every_place["raw"]


def test_explicit_data_dir_never_falls_back(every_place, tmp_path):
    # the user named a folder: reading some other copy instead would hide their mistake
    with pytest.raises(UserError, match="not found"):
        find_data_dir(str(tmp_path / "missing"))


def test_not_found_lists_places_and_both_remedies(every_place):
    for name in ("env", "data", "raw", "debian"):
        remove_split(every_place[name])
    with pytest.raises(UserError) as err:
        find_data_dir(None)
    message = str(err.value)
    assert "\n" not in message
    for folder in (every_place["env"], "data", "data/FashionMNIST/raw", every_place["debian"]):
        assert str(folder) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message


# ---------------------------------------------------------------- bad files: one clear UserError each


def damage_truncate(folder):
    path = folder / FILES["test"][0]
    path.write_bytes(path.read_bytes()[:-100])


def damage_magic(folder):
    # a labels file where the images file belongs: the classic swapped-file mistake
    images, labels = tiny_split()
    write_idx(folder / FILES["test"][0], labels, LABELS_MAGIC)


def damage_count(folder):
    images, labels = tiny_split()
    write_idx(folder / FILES["test"][1], labels[:-1], LABELS_MAGIC)


def damage_label(folder):
    labels = tiny_split()[1].copy()
    labels[3] = len(CLASSES)
    write_idx(folder / FILES["test"][1], labels, LABELS_MAGIC)


def damage_shape(folder):
    write_idx(folder / FILES["test"][0], np.zeros((20, 32, 32), np.uint8), IMAGES_MAGIC)


def damage_empty(folder):
    (folder / FILES["test"][1]).write_bytes(b"")


def damage_gzip_truncated(folder):
    gzip_folder(folder)
    path = folder / (FILES["test"][0] + ".gz")
    path.write_bytes(path.read_bytes()[:200])


def damage_gzip_corrupt(folder):
    gzip_folder(folder)
    path = folder / (FILES["test"][0] + ".gz")
    raw = bytearray(path.read_bytes())
    raw[10:14] = bytes(b ^ 0xFF for b in raw[10:14])  # the first deflate block header: a zlib.error
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, expected", [
    (damage_truncate, "truncated or corrupt"),
    (damage_magic, "magic number 2049, expected 2051"),
    (damage_count, "20 images but"),
    (damage_label, "label 10, expected 0..9"),
    (damage_shape, "expected 28 x 28"),
    (damage_empty, "not an IDX file"),
    (damage_gzip_truncated, "cannot read"),
    (damage_gzip_corrupt, "cannot read"),
])
def test_bad_idx_file_is_a_clear_user_error(tmp_path, damage, expected):
    write_split(tmp_path, "test", *tiny_split())
    damage(tmp_path)
    with pytest.raises(UserError) as err:
        read_split(tmp_path, "test")
    assert expected in str(err.value) and "\n" not in str(err.value)
