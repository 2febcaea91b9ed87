"""The Fashion-MNIST reader: real data (sizes, labels, split) and small generated IDX files (lookup, bad files)."""

import gzip
import os
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import write_split

from fashion_ft import data
from fashion_ft.data import (
    CLASSES,
    FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    find_data_dir,
    label_warning,
    load_split,
    read_idx,
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


@pytest.mark.parametrize("env", ["", None])  # set but empty counts as unset
def test_lookup_order(every_place, monkeypatch, env):
    assert find_data_dir(str(every_place["flag"])).resolve() == every_place["flag"]
    monkeypatch.delenv("FASHION_MNIST_DIR") if env is None else monkeypatch.setenv("FASHION_MNIST_DIR", env)
    # with neither --data-dir nor $FASHION_MNIST_DIR: ./data, data/FashionMNIST/raw, the Debian folder, in that order
    for name, next_name in [("data", "raw"), ("raw", "debian")]:
        assert find_data_dir(None).resolve() == every_place[name]
        remove_split(every_place[name])
        assert find_data_dir(None).resolve() == every_place[next_name]
    remove_split(every_place["debian"])
    with pytest.raises(UserError, match="not found"):
        find_data_dir(None)


def test_data_dir_flag_wins_over_the_variable(every_place):
    assert find_data_dir(str(every_place["flag"])).resolve() == every_place["flag"]
    remove_split(every_place["flag"])
    with pytest.raises(UserError, match="not found"):
        find_data_dir(str(every_place["flag"]))


def test_the_variable_is_the_only_place_looked_at(every_place):
    assert find_data_dir(None).resolve() == every_place["env"]
    remove_split(every_place["env"])  # ./data and the Debian folder still hold the files: not read instead
    with pytest.raises(UserError) as err:
        find_data_dir(None)
    message = str(err.value)
    assert "not found" in message and "$FASHION_MNIST_DIR" in message and str(every_place["env"]) in message
    assert str(every_place["debian"]) not in message and "\n" not in message


@pytest.mark.parametrize("named_by", ["flag", "env"])
def test_a_named_folder_may_have_torchvision_layout(every_place, monkeypatch, named_by):
    remove_split(every_place["data"])  # left: data/FashionMNIST/raw, where torchvision downloads to
    if named_by == "env":
        monkeypatch.setenv("FASHION_MNIST_DIR", str(every_place["data"]))
    assert find_data_dir(str(every_place["data"]) if named_by == "flag" else None).resolve() == every_place["raw"]


def test_explicit_data_dir_never_falls_back(every_place, tmp_path):
    # the user named a folder: reading some other copy instead would hide their mistake
    with pytest.raises(UserError, match="not found"):
        find_data_dir(str(tmp_path / "missing"))


@pytest.mark.parametrize("env_set", [True, False])
def test_not_found_lists_places_and_both_remedies(every_place, monkeypatch, env_set):
    for name in ("env", "data", "raw", "debian"):
        remove_split(every_place[name])
    if not env_set:
        monkeypatch.delenv("FASHION_MNIST_DIR")
    with pytest.raises(UserError) as err:
        find_data_dir(None)
    message = str(err.value)
    assert "\n" not in message
    places = [every_place["env"], every_place["env"] / "FashionMNIST/raw"] if env_set else \
        ["data", "data/FashionMNIST/raw", every_place["debian"]]
    for folder in places:
        assert str(folder) in message
    assert ("$FASHION_MNIST_DIR" in message) == env_set
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message


# ---------------------------------------------------------------- bad files: one clear UserError each


def idx_header(magic, *dims):
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


def idx_bytes(magic, array):
    return idx_header(magic, *array.shape) + array.tobytes()


LABELS = tiny_split()[1]
IMAGES_FILE, LABELS_FILE = FILES["test"]
# name: (gzip the files first, which file is damaged, its damaged contents from its contents, expected message)
BAD_FILES = {
    "truncated": (False, IMAGES_FILE, lambda raw: raw[:-100], "truncated or corrupt"),
    # a labels file where the images file belongs: the classic swapped-file mistake
    "swapped": (False, IMAGES_FILE, lambda raw: idx_bytes(LABELS_MAGIC, LABELS), "magic number 2049, expected 2051"),
    "label missing": (False, LABELS_FILE, lambda raw: idx_bytes(LABELS_MAGIC, LABELS[:-1]), "20 images but"),
    "label 10": (False, LABELS_FILE, lambda raw: raw[:-1] + bytes([len(CLASSES)]), "label 10, expected 0..9"),
    "32 x 32": (False, IMAGES_FILE, lambda raw: idx_bytes(IMAGES_MAGIC, np.zeros((20, 32, 32), np.uint8)),
                "expected 28 x 28"),
    "empty": (False, LABELS_FILE, lambda raw: b"", "not an IDX file"),
    "gzip truncated": (True, IMAGES_FILE, lambda raw: raw[:200], "cannot read"),
    # the first deflate block header: a zlib.error
    "gzip corrupt": (True, IMAGES_FILE, lambda raw: raw[:10] + bytes(b ^ 0xFF for b in raw[10:14]) + raw[14:],
                     "cannot read"),
    # a well-formed .gz of a file that lost its end before it was compressed
    "gzip short": (True, IMAGES_FILE, lambda raw: gzip.compress(gzip.decompress(raw)[:-100]),
                   "is truncated or corrupt: header says 15696 bytes, it inflates to 15596"),
    "raw long": (False, LABELS_FILE, lambda raw: raw + b"\0",
                 "is truncated or corrupt: header says 28 bytes, file has 29"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_idx_file_is_a_clear_user_error(tmp_path, name):
    gzipped, which, damage, expected = BAD_FILES[name]
    write_split(tmp_path, "test", *tiny_split())
    if gzipped:
        gzip_folder(tmp_path)
    path = tmp_path / (which + (".gz" if gzipped else ""))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError) as err:
        read_split(tmp_path, "test")
    assert expected in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- lying headers: refused before the data is read


def gzip_bomb(path):
    # 100 images promised, 10 MB of zeros behind them: a 10 kB file
    path = path.with_suffix(".gz")
    path.write_bytes(gzip.compress(idx_header(IMAGES_MAGIC, 100, 28, 28) + bytes(10_000_000), compresslevel=1))
    return path


def sparse_raw(path, dims, size=None):
    """A file with the header of `dims` and then a hole, of exactly the size that header says unless `size`."""
    path.write_bytes(idx_header(IMAGES_MAGIC, *dims))
    os.truncate(path, size or 16 + dims[0] * dims[1] * dims[2])
    return path


@pytest.mark.parametrize("make, expected", [
    (gzip_bomb, "inflates to more than the 78416 bytes its header says"),
    (lambda path: sparse_raw(path, (60_000, 28, 28), size=2**30),
     "truncated or corrupt: header says 47040016 bytes, file has 1073741824"),
    # more images than Fashion-MNIST has, and a file that really holds them: still not believed
    (lambda path: sparse_raw(path, (100_000, 28, 28)), "is corrupt: its header says 78400000 bytes of data"),
    (lambda path: sparse_raw(path, (2**32 - 1, 2**32 - 1, 2**32 - 1), size=16), "is corrupt: its header says"),
])
def test_lying_header_is_refused_before_the_data_is_read(tmp_path, make, expected):
    path = make(tmp_path / "images")
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as err:
            read_idx(path, IMAGES_MAGIC)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert peak < 1_000_000, f"{peak} bytes allocated to refuse it"


# ---------------------------------------------------------------- something other than a file in a file's place


def within(seconds, call):
    """What `call` raised, or fail when it blocks (opening a FIFO for reading waits for a writer)."""
    outcome = []

    def target():
        try:
            call()
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)  # daemon: a blocked one does not hold up pytest's exit
    thread.start()
    thread.join(seconds)
    assert outcome, f"blocked for over {seconds} s"
    return outcome[0]


NOT_FILES = {
    "directory": os.mkdir,
    "FIFO": os.mkfifo,
    "link to /dev/zero": lambda path: os.symlink("/dev/zero", path),
}


@pytest.mark.parametrize("kind", NOT_FILES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_not_a_regular_file_is_named_and_never_opened(tmp_path, kind, suffix):
    write_split(tmp_path, "test", *tiny_split())
    path = tmp_path / (FILES["test"][0] + suffix)
    (tmp_path / FILES["test"][0]).unlink()
    NOT_FILES[kind](path)
    for call in (lambda: find_data_dir(str(tmp_path), "test"), lambda: read_split(tmp_path, "test"),
                 lambda: read_idx(path, IMAGES_MAGIC)):
        err = within(5, call)
        assert isinstance(err, UserError) and str(err) == f"{path} is not a regular file"


def test_link_to_a_regular_file_is_read(tmp_path):
    write_split(tmp_path / "real", "test", *tiny_split())
    (tmp_path / "linked").mkdir()
    for stem in FILES["test"]:
        os.symlink(tmp_path / "real" / stem, tmp_path / "linked" / stem)
    assert torch.equal(read_split(tmp_path / "linked", "test")[0], read_split(tmp_path / "real", "test")[0])


def test_download_does_not_hide_an_unusable_file(tmp_path, monkeypatch):
    write_split(tmp_path, "test", *tiny_split())
    (tmp_path / FILES["test"][0]).unlink()
    os.mkdir(tmp_path / FILES["test"][0])
    monkeypatch.setattr(data, "download", lambda root: pytest.fail("downloaded another copy"))
    with pytest.raises(UserError, match="is not a regular file"):
        load_split(str(tmp_path), "test", allow_download=True)


# ---------------------------------------------------------------- label_warning


def labels_of(*counts):
    return torch.cat([torch.full((n,), cls) for cls, n in enumerate(counts)])


@pytest.mark.parametrize("labels, expected", [
    (labels_of(*[100] * 10), None),
    (labels_of(*[100] * 9, 10), None),  # 10 of 910: just over a tenth of the fair share of 91
    (labels_of(*[100] * 9, 9), "the training images hold too few of some classes (Ankle boot 9 of 909, "),
    (torch.tensor([], dtype=torch.int64), None),
    (labels_of(0, 50), "the training images hold only 1 of the 10 classes (Trouser): "
                       "nothing is learned or measured on the others"),
    (labels_of(*[5] * 8, 0, 5), "the training images hold only 9 of the 10 classes (no Bag): "),
    (labels_of(*[5] * 5), "the training images hold only 5 of the 10 classes (T-shirt/top, Trouser, Pullover, "
                          "Dress, Coat): "),
    (labels_of(*[100] * 8, 3, 100), "the training images hold too few of some classes (Bag 3 of 903, a fair "
                                    "share being 90): "),
])
def test_label_warning(labels, expected):
    warning = label_warning(labels, "the training images")
    if expected is None:
        assert warning is None
    else:
        assert warning.startswith(expected) and "\n" not in warning, warning
