"""The Fashion-MNIST reader: real data (sizes, labels, split) and small generated IDX files (lookup, bad files)."""

import gzip
import hashlib
import os
import signal
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import read_split, write_idx, write_split

from fashion_ft import data
from fashion_ft.errors import UserError

# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_train(real_data_dir):
    # reading 60k gzipped images takes seconds: once per module
    return read_split(real_data_dir, "train")


@pytest.mark.parametrize("split, n", [("train", 60_000), ("test", 10_000)])
def test_real_sizes_and_label_histogram(request, real_data_dir, split, n):
    images, labels = request.getfixturevalue("real_train") if split == "train" else read_split(real_data_dir, split)
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    # Fashion-MNIST is exactly balanced: 6,000 / 1,000 images per class
    assert torch.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    assert 0 < images.float().mean() / 255 < 1  # real pixels, not a zero-filled buffer


# A checkpoint records only (seed, size): the same pair must pick the same images in every version.
@pytest.mark.parametrize("val_size, digest", [(5000, "428a5468aea2f73d"), (4999, "973328851c1373ae"),
                                              (5001, "30b8e895d3faa4b5"), (7, "e3a8e954e9d4a8cf")])
def test_split_is_stratified_disjoint_complete_and_seeded(real_train, val_size, digest):
    labels = real_train[1]
    train_idx, val_idx = data.stratified_split(labels, val_size, seed=42)
    counts = torch.bincount(labels[val_idx], minlength=10)  # 500 of each class at 5000
    assert int(counts.sum()) == val_size and int(counts.max() - counts.min()) <= 1
    assert torch.equal(torch.cat([train_idx, val_idx]).sort().values, torch.arange(60_000))
    assert hashlib.sha256(val_idx.numpy().tobytes()).hexdigest()[:16] == digest
    assert not torch.equal(data.stratified_split(labels, val_size, seed=7)[1], val_idx)


# ---------------------------------------------------------------- small generated IDX files


def tiny_split():
    return np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20, dtype=np.uint8) % 10


def gzip_folder(folder):
    """Replace every IDX file in `folder` by its .gz version."""
    for path in list(folder.iterdir()):
        (folder / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()


def linked(folder):
    """The files of `folder` moved to a sibling and linked back: a link to a regular file is a file."""
    (folder.parent / "real").mkdir()
    for path in list(folder.iterdir()):
        os.symlink(path.rename(folder.parent / "real" / path.name), path)


@pytest.mark.parametrize("make", [lambda folder: None, gzip_folder, linked], ids=["raw", "gz", "linked"])
def test_reads_raw_gz_and_linked_files(tmp_path, make):
    images, labels = tiny_split()
    write_split(tmp_path / "d", "test", images, labels)
    make(tmp_path / "d")
    got_images, got_labels = read_split(tmp_path / "d", "test")
    assert np.array_equal(got_images.numpy(), images) and got_labels.tolist() == labels.tolist()


PLACES = {"flag": "flag", "env": "env", "data": "data", "raw": "data/FashionMNIST/raw", "debian": "debian"}
# (--data-dir, $FASHION_MNIST_DIR, places whose files are removed, the place found; None: not found)
LOOKUPS = [
    ("flag", "env", [], "flag"),
    ("flag", "env", ["flag"], None),  # the user named a folder: another copy would hide their mistake
    (None, "env", [], "env"),
    (None, "env", ["env"], None),  # ./data and the Debian folder still hold files: not read instead
    (None, "", [], "data"),  # set but empty counts as unset
    (None, None, [], "data"),
    (None, None, ["data"], "raw"),
    (None, None, ["data", "raw"], "debian"),
    (None, None, ["data", "raw", "debian"], None),
    ("data", None, ["data"], "raw"),  # a named folder may have torchvision's layout
    (None, "data", ["data"], "raw"),
]


@pytest.mark.parametrize("flag, env, removed, found", LOOKUPS)
def test_lookup_order(tmp_path, monkeypatch, flag, env, removed, found):
    monkeypatch.chdir(tmp_path)
    for name, sub in PLACES.items():
        if name not in removed:
            write_split(tmp_path / sub, "train", *tiny_split())
    monkeypatch.setattr(data, "DEBIAN_DIR", str(tmp_path / "debian"))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    if env is not None:
        monkeypatch.setenv("FASHION_MNIST_DIR", env and str(tmp_path / PLACES[env]))
    data_dir = flag and str(tmp_path / PLACES[flag])
    if found:
        assert data.find_data_dir(data_dir).resolve() == tmp_path / PLACES[found]
        return
    with pytest.raises(UserError) as err:
        data.find_data_dir(data_dir)
    message = str(err.value)
    assert "not found" in message and "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message  # both remedies
    assert ("$FASHION_MNIST_DIR" in message) == (not flag and bool(env))
    assert (str(tmp_path / "debian") in message) == (not flag and not env)


# ---------------------------------------------------------------- bad files: one line naming the file, at once

def sparse(dims, size=None):
    """The file rewritten as the header of `dims`, then a hole up to `size` bytes (default: what that header says)."""
    def make(path):
        path.write_bytes(struct.pack(">4I", data.IMAGES_MAGIC, *dims))
        os.truncate(path, size or 16 + dims[0] * dims[1] * dims[2])
    return make


def contents(change):
    return lambda path: path.write_bytes(change(path.read_bytes()))


LABELS = tiny_split()[1]
# name: (gzip the files first, the images or the labels file, what is done to it)
BAD_FILES = {
    "truncated": (False, 0, contents(lambda raw: raw[:-100])),
    "one byte long": (False, 1, contents(lambda raw: raw + b"\0")),
    "empty": (False, 1, contents(lambda raw: b"")),
    "header cut": (False, 0, contents(lambda raw: raw[:10])),
    "labels for images": (False, 0, lambda path: write_idx(path, LABELS, data.LABELS_MAGIC)),  # the swapped file
    "a label missing": (False, 1, lambda path: write_idx(path, LABELS[:-1], data.LABELS_MAGIC)),
    "label 10": (False, 1, contents(lambda raw: raw[:-1] + bytes([len(data.CLASSES)]))),
    "32 x 32": (False, 0, lambda path: write_idx(path, np.zeros((20, 32, 32), np.uint8), data.IMAGES_MAGIC)),
    "gz truncated": (True, 0, contents(lambda raw: raw[:200])),
    "gz corrupt": (True, 0, contents(lambda raw: raw[:10] + bytes(b ^ 0xFF for b in raw[10:14]) + raw[14:])),
    "gz not gzip": (True, 0, contents(gzip.decompress)),
    "gz of a truncated file": (True, 0, contents(lambda raw: gzip.compress(gzip.decompress(raw)[:-100]))),
    # 20 images promised, 10 MB of zeros behind them in a 10 kB file
    "gz bomb": (True, 0, contents(lambda raw: gzip.compress(gzip.decompress(raw)[:16] + bytes(10**7), 1))),
    # lying headers, with the holes of sparse files behind them: refused before a byte of data is read
    "header under the file": (False, 0, sparse((60_000, 28, 28), size=2**30)),
    "more images than Fashion-MNIST": (False, 0, sparse((100_000, 28, 28))),
    "2**96 bytes promised": (False, 0, sparse((2**32 - 1,) * 3, size=16)),
    # something other than a file: a FIFO would block the read, /dev/zero would never end it
    "directory": (False, 0, lambda path: path.unlink() or os.mkdir(path)),
    "FIFO": (False, 0, lambda path: path.unlink() or os.mkfifo(path)),
    "FIFO.gz": (True, 0, lambda path: path.unlink() or os.mkfifo(path)),
    "link to /dev/zero": (False, 0, lambda path: path.unlink() or os.symlink("/dev/zero", path)),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_is_one_line_naming_it(tmp_path, monkeypatch, name):
    gzipped, which, damage = BAD_FILES[name]
    write_split(tmp_path, "test", *tiny_split())
    if gzipped:
        gzip_folder(tmp_path)
    path = tmp_path / (data.FILES["test"][which] + (".gz" if gzipped else ""))
    damage(path)
    monkeypatch.setattr(data, "download", lambda root: pytest.fail("downloaded another copy"))
    # opening a FIFO for reading waits for a writer: the alarm fails a read that blocks instead of hanging the run
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked reading it"))
    signal.alarm(10)
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as err:
            data.load_split(str(tmp_path), "test", allow_download=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert err.value.exit_code == 1 and str(path) in str(err.value) and "\n" not in str(err.value)
    assert peak < 2_000_000, f"{peak} bytes allocated to refuse it"


# ---------------------------------------------------------------- label_warning


def labels_of(*counts):
    return torch.cat([torch.full((n,), cls) for cls, n in enumerate(counts)])


@pytest.mark.parametrize("labels, expected", [
    (labels_of(*[100] * 10), None),
    (labels_of(*[100] * 9, 10), None),  # 10 of 910: just over a tenth of the fair share of 91
    (torch.tensor([], dtype=torch.int64), None),
    (labels_of(*[100] * 8, 3, 100), "the training images hold too few of some classes (Bag 3 of 903, a fair "
                                    "share being 90): "),
    (labels_of(0, 50), "the training images hold only 1 of the 10 classes (Trouser): "
                       "nothing is learned or measured on the others"),
    (labels_of(*[5] * 8, 0, 5), "the training images hold only 9 of the 10 classes (no Bag): "),
])
def test_label_warning(labels, expected):
    warning = data.label_warning(labels, "the training images")
    assert warning == expected if expected is None else (warning.startswith(expected) and "\n" not in warning)
