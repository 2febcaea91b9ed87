"""Fashion-MNIST: find and read the IDX files, split them, batch and augment on the device, and tell which
input normalisation a model was trained with. The whole set is one uint8 tensor on the training device (60k x
28 x 28 = 47 MB): a batch is an index slice of a per-epoch permutation, normalised and augmented whole there,
so the hot loop has no per-sample Python and no DataLoader workers (the airbench approach)."""

import gzip
import hashlib
import math
import os
import shutil
import struct
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError, UserError, first_line, resolve_path

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Pixel statistics of the 60k training images, scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
# The data of the largest Fashion-MNIST file: a header that promises more is corrupt, not believed.
MAX_IDX_DATA = 60_000 * 28 * 28
ENV_DIR = "FASHION_MNIST_DIR"
MIN_IMAGES = 10  # fewer images than classes in a split cannot measure anything
DEFAULT_SPLIT = (42, 5000)  # (seed, validation images) when neither the user nor the starting model says
# Where the validation images come from: held out of the training files, or one stratified half of the
# test files (the other half is then the test).
VALIDATION_SOURCES = ("train", "test-half")
GET_DATA_HINT = ("get it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu) "
                 "or pass --download to fetch it into ./data")


# ---------------------------------------------------------------- finding and reading the files

def _idx_path(folder: Path, stem: str) -> Path | None:
    """The raw or else the .gz file of `stem` in `folder`, if either is there. Whatever stands there is
    returned, file or not: read_idx names what is not a file, where skipping it would read another copy."""
    return next((path for path in (folder / stem, folder / f"{stem}.gz") if path.exists()), None)


def find_data_dir(data_dir: str | None = None, split: str = "train", allow_download: bool = False) -> Path:
    """The first folder that holds both IDX files of `split`, else with allow_download a fresh copy. A folder
    the user named (--data-dir, else $FASHION_MNIST_DIR) is the only place looked at: reading some other copy
    would hide their mistake. A file that is there but unusable is read_idx's to refuse, not downloaded over."""
    if data_dir:
        resolve_path(Path(data_dir), "--data-dir")  # a symlink loop is a bad flag, worded as for every path
    named = data_dir or os.environ.get(ENV_DIR)
    tried = ([Path(named), Path(named) / "FashionMNIST" / "raw"] if named
             else [Path("data"), Path("data/FashionMNIST/raw"), Path(DEBIAN_DIR)])
    for folder in tried:
        if all(_idx_path(folder, stem) for stem in FILES[split]):
            return folder
    if allow_download:
        return download(data_dir or "data")
    hint = f"point ${ENV_DIR} at them, or unset it and {GET_DATA_HINT}" if named and not data_dir else GET_DATA_HINT
    raise UserError(f"Fashion-MNIST {split} files not found (looked in: {', '.join(map(str, tried))}); {hint}")


def download(root: str) -> Path:
    """torchvision's downloader, only on the user's --download; a failed one leaves no empty folders behind."""
    from torchvision.datasets import FashionMNIST

    first_new = next((p for p in reversed([Path(root), *Path(root).parents]) if not p.exists()), None)
    try:
        for train in (True, False):
            FashionMNIST(root, train=train, download=True)
    except Exception as exc:  # network errors come in many types, with several lines of detail
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
        reason = first_line(exc) or type(exc).__name__
        raise UserError(f"--download: fetching Fashion-MNIST into {root} failed ({reason}); "
                        f"without a network: {GET_DATA_HINT.split(' or ')[0]}") from None
    return Path(root) / "FashionMNIST" / "raw"


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file as a uint8 array. Only a regular file is opened (a FIFO would block, a device never end),
    and no more is read than its header promises, which may not pass MAX_IDX_DATA and must match a raw file's
    size: a lying header or a gzip bomb costs no more than the data of a real file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a regular file")
    gz = path.suffix == ".gz"
    try:
        with (gzip.open if gz else open)(path, "rb") as fh:
            found = int.from_bytes(fh.read(4), "big")
            if found != magic:
                raise UserError(f"{path} is not the right IDX file: magic number {found}, expected {magic}")
            dims = struct.unpack(f">{magic & 0xFF}I", fh.read(4 * (magic & 0xFF)))  # the magic's last byte
            size = math.prod(dims)
            fits = size <= MAX_IDX_DATA and (gz or path.stat().st_size == fh.tell() + size)
            data = fh.read(size + 1) if fits else b""  # one byte past the promise tells a longer stream
    except struct.error:
        raise UserError(f"{path} is truncated: its header ends early") from None
    except (OSError, EOFError, zlib.error) as exc:  # a damaged .gz raises any of these
        raise UserError(f"cannot read {path}: {exc}") from None
    if not fits or len(data) != size:
        raise UserError(f"{path} is truncated or corrupt: its header promises {size} bytes of data")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """An uncompressed IDX file of a uint8 array (the inverse of read_idx)."""
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    Path(path).write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 28 x 28, labels int64 N) of one split, checked for consistency."""
    image_path, label_path = (_idx_path(folder, stem) or folder / stem for stem in FILES[split])
    images, labels = read_idx(image_path, IMAGES_MAGIC), read_idx(label_path, LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise UserError(f"{image_path} holds {images.shape[1:]} images, expected 28 x 28")
    if len(images) != len(labels):
        raise UserError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if len(labels) < MIN_IMAGES:
        raise UserError(f"{image_path} holds {len(labels)} images: too few to train or measure anything "
                        f"(at least {MIN_IMAGES})")
    if labels.max() >= len(CLASSES):
        raise UserError(f"{label_path} has label {labels.max()}, expected 0..{len(CLASSES) - 1}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_split(data_dir: str | None, split: str, allow_download: bool = False):
    """Find and read one split; with allow_download, fetch it first when it is nowhere to be found."""
    return read_split(find_data_dir(data_dir, split, allow_download), split)


# ---------------------------------------------------------------- splitting

def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed, seeded (train_idx, val_idx), every class in proportion in the validation part (0 <= val_size < N)."""
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    quota = torch.bincount(labels, minlength=len(CLASSES)).double() * val_size / n
    take = quota.floor().long()
    # largest remainders get the leftover places, so the sizes add up to val_size exactly
    leftover = val_size - int(take.sum())
    take[torch.argsort(quota - take, descending=True, stable=True)[:leftover]] += 1
    shuffled_labels = labels[perm]
    val_idx = torch.cat([perm[shuffled_labels == cls][:int(take[cls])] for cls in range(len(CLASSES))]).sort().values
    is_train = torch.ones(n, dtype=torch.bool)
    is_train[val_idx] = False
    return torch.arange(n)[is_train], val_idx


def label_warning(labels: torch.Tensor, what: str) -> str | None:
    """A one-line warning when `what` ("the training images", ...) lacks classes or holds too few of one
    (under a tenth of its fair share), else None. An empty set is the caller's matter, not a mix of classes."""
    counts = torch.bincount(labels.flatten().cpu(), minlength=len(CLASSES)).tolist()
    n, present = sum(counts), [name for name, count in zip(CLASSES, counts) if count]
    missing = [name for name in CLASSES if name not in present]
    if n and missing:  # the shorter list: "(Trouser)" rather than nine names, "(no Bag)" rather than nine
        names = ", ".join(present) if len(present) <= len(missing) else "no " + ", ".join(missing)
        return (f"{what} hold only {len(present)} of the {len(CLASSES)} classes ({names}): nothing is learned "
                "or measured on the others")
    scarce = [f"{name} {count}" for name, count in zip(CLASSES, counts) if count < n / len(CLASSES) / 10]
    return (f"{what} hold too few of some classes ({', '.join(scarce)} of {n}, a fair share being "
            f"{n / len(CLASSES):.0f}): what is learned or measured on them is unreliable") if scarce else None


@dataclass(frozen=True)
class Split:
    """Which training images were held out for validation: travels in every checkpoint, so that a
    fine-tune validates on images its starting model never trained on."""

    seed: int
    val_size: int
    fingerprint: str | None = None  # of the training files' contents; None: unknown
    validation: str = "train"  # one of VALIDATION_SOURCES

    def to_dict(self) -> dict:
        return asdict(self)

    def same_images(self, other: "Split") -> bool:
        """Same seed, size and source, on the same training files where both fingerprints are known."""
        same_files = not (self.fingerprint and other.fingerprint) or self.fingerprint == other.fingerprint
        return same_files and replace(self, fingerprint=None) == replace(other, fingerprint=None)

    def describe(self) -> str:
        if self.validation == "test-half":
            return f"half of the test images, split seed {self.seed}; the other half is the test"
        return f"split seed {self.seed}, {self.val_size} validation images"


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """Of the decoded contents, so that the .gz and the raw copies of the same files agree."""
    digest = hashlib.sha256(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def choose_split(asked: Split, record: Split | None, source: str | None,
                 labels: torch.Tensor | None = None) -> tuple[Split, list[str]]:
    """The split a run uses, and its warnings about validating on its starting model's training images.
    `asked`: the user's --split-seed / --val-size / --val-from (None: not given) and the data's fingerprint;
    `record`: the split `source` was trained with (None: unknown); `source` None: random weights, any split is
    right. With the training `labels`, validation images that all lie in the recorded ones are safe."""
    unknown = source is not None and record is None and asked.val_size is None  # --val-size: "I know its split"
    # a model whose training split is unknown may have seen every training image: it validates on the test
    # half unless told its split (bench/results/own-model/)
    base = record or Split(*DEFAULT_SPLIT, validation="test-half" if unknown else "train")
    validation = asked.validation or base.validation
    if validation == "test-half" and asked.val_size is not None:
        raise UsageError("--val-size: with --val-from test-half the validation images are half of the test images")
    chosen = Split(base.seed if asked.seed is None else asked.seed,
                   base.val_size if asked.val_size is None else asked.val_size, asked.fingerprint, validation)
    if unknown and validation == "test-half":
        return chosen, [f"{source} has no record of its training split, so it may have trained on every training "
                        f"image: this run validates on {chosen.describe()} (--val-from train: validate on "
                        "training images)"]
    if source is None or validation == "test-half":  # no training image validates
        return chosen, []
    risk = "its validation images may have been in its training data, which biases the best-model choice"
    if record is None:
        return chosen, [f"{source} has no record of its validation split: {risk}; if you know the split it was "
                        "trained with, pass --split-seed and --val-size"]
    if record.validation == "test-half":
        return chosen, [f"{source} was trained on every training image (it validated on half of the test images): "
                        f"{risk}; drop --val-from to validate as it did"]
    if record.fingerprint and asked.fingerprint and record.fingerprint != asked.fingerprint:
        return chosen, [f"{source} was trained on other training files (fingerprint {record.fingerprint}, "
                        f"these are {asked.fingerprint}): {risk}"]
    if not chosen.same_images(record) and not held_out(chosen, record, labels):
        return chosen, [f"{source} was trained with {record.describe()}, this run uses {chosen.describe()}: "
                        f"{risk}; drop --split-seed/--val-size to use its split"]
    return chosen, []


def held_out(chosen: Split, record: Split, labels: torch.Tensor | None) -> bool:
    """Whether every validation image of `chosen` was also held out by `record` (on these labels)."""
    if labels is None or max(chosen.val_size, record.val_size) >= len(labels):
        return False
    chosen_val, record_val = (stratified_split(labels, s.val_size, s.seed)[1] for s in (chosen, record))
    return bool(torch.isin(chosen_val, record_val).all())


def test_halves(test_labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(test, validation) indices of --val-from test-half: two stratified halves of the test images."""
    return stratified_split(test_labels, len(test_labels) // 2, seed)


def split_sets(train: tuple, test: tuple, split: Split, limit_train: int | None, seed: int) -> dict:
    """{"train", "val", "test"} -> (images, labels): the stratified split of `split.validation`'s files, then
    with --limit-train a seeded subset of the training part."""
    (images, labels), (test_images, test_labels) = train, test
    if split.validation == "test-half":
        train_idx, (test_idx, val_idx) = torch.arange(len(labels)), test_halves(test_labels, split.seed)
        val, test = (test_images[val_idx], test_labels[val_idx]), (test_images[test_idx], test_labels[test_idx])
    else:
        if split.val_size >= len(labels):
            raise UsageError(f"--val-size {split.val_size} leaves no training images: the training files hold only "
                             f"{len(labels)} images")
        train_idx, val_idx = stratified_split(labels, split.val_size, split.seed)
        val = (images[val_idx], labels[val_idx])
    if limit_train is not None:
        if limit_train > len(train_idx):
            raise UsageError(f"--limit-train {limit_train} exceeds the {len(train_idx)} training images")
        pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))
        train_idx = train_idx[pick[:limit_train]].sort().values
    return {"train": (images[train_idx], labels[train_idx]), "val": val, "test": test}


# ---------------------------------------------------------------- device-resident data and batches

@dataclass
class DeviceData:
    """A split on the device: uint8 images N x 1 x 28 x 28 and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def create(cls, images, labels, device):
        return cls(images.unsqueeze(1).contiguous().to(device), labels.to(device))

    def __len__(self):
        return len(self.labels)


def epoch_permutation(n: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The same permutation on every rank and on resume: a function of (seed, epoch) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)


def batch_slices(n: int, batch_size: int, drop_last: bool):
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield slice(start, min(start + batch_size, n))


# ---------------------------------------------------------------- batched augmentation
# Resume is bit-exact: each function below draws its random numbers in a fixed order, which must not change.

@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 0.0
    shift_px: float = 0.0
    hflip: bool = False
    erase_p: float = 0.0


AUGMENT_PRESETS = {
    "none": AugmentConfig(),
    "light": AugmentConfig(rotate_deg=10.0),
    "strong": AugmentConfig(rotate_deg=10.0, shift_px=2.0, hflip=True, erase_p=0.25),
}


def _uniform(n, low, high, gen, device):
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def affine_grid(theta: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """F.affine_grid(theta, (n, C, h, w), align_corners=False) as two broadcast multiply-adds: on a CPU
    the batched 3-wide matmul inside affine_grid cost most of our augmentation time."""
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, dtype=theta.dtype, device=theta.device).view(1, 1, w, 1)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, dtype=theta.dtype, device=theta.device).view(1, h, 1, 1)
    cols = theta.transpose(1, 2).reshape(n, 3, 1, 1, 2)  # the x, y and translation columns
    return torch.addcmul(torch.addcmul(cols[:, 2], cols[:, 0], xs), cols[:, 1], ys)


def random_affine(x: torch.Tensor, aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Rotation, shift and horizontal flip of a float batch (N, C, H, W) in one grid_sample."""
    n, device = x.shape[0], x.device
    angle = _uniform(n, -aug.rotate_deg, aug.rotate_deg, gen, device) * (math.pi / 180)
    flip = torch.where(torch.rand(n, generator=gen, device=device) < 0.5, -1.0, 1.0) if aug.hflip else 1.0
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size
    tx = _uniform(n, -aug.shift_px, aug.shift_px, gen, device) * (2 / x.shape[-1])
    ty = _uniform(n, -aug.shift_px, aug.shift_px, gen, device) * (2 / x.shape[-2])
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = affine_grid(theta.to(x.dtype), n, x.shape[-2], x.shape[-1])
    # zeros outside the image: black, which is Fashion-MNIST's background
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_erase(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Zero one random rectangle (2-20% of the area, aspect 0.3-3.3) in a fraction p of the images."""
    (n, _, h, w), device = x.shape, x.device
    area = _uniform(n, 0.02, 0.20, gen, device) * (h * w)
    log_ratio = _uniform(n, math.log(0.3), math.log(3.3), gen, device)
    eh = torch.sqrt(area * torch.exp(log_ratio)).clamp(1, h)
    ew = torch.sqrt(area / torch.exp(log_ratio)).clamp(1, w)
    top = torch.rand(n, generator=gen, device=device) * (h - eh)
    left = torch.rand(n, generator=gen, device=device) * (w - ew)
    chosen = torch.rand(n, generator=gen, device=device) < p
    top, left, eh, ew, chosen = (t.view(n, 1, 1) for t in (top, left, eh, ew, chosen))
    rows, cols = torch.arange(h, device=device).view(1, h, 1), torch.arange(w, device=device).view(1, 1, w)
    box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    return x.masked_fill((box & chosen).unsqueeze(1), 0.0)


def augment(x01: torch.Tensor, aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Augment a float batch in [0, 1] (before normalisation, so that 0 is background)."""
    if aug.rotate_deg or aug.shift_px or aug.hflip:
        x01 = random_affine(x01, aug, gen)
    if aug.erase_p:
        x01 = random_erase(x01, aug.erase_p, gen)
    return x01


def augmented(images_uint8, aug: AugmentConfig | None, gen) -> torch.Tensor:
    """uint8 batch -> float batch in [0, 1], augmented: what every model of a step sees, before each
    normalises it its own way (a teacher and its student may have been trained with different ones)."""
    x = images_uint8.float().div_(255.0)
    return augment(x, aug, gen) if aug is not None else x


def normalize(x01, mean, std, memory_format=torch.contiguous_format) -> torch.Tensor:
    """(x01 - mean) / std in place, in `memory_format`."""
    return x01.sub_(mean).div_(std).contiguous(memory_format=memory_format)


def make_batch(images_uint8, aug: AugmentConfig | None, gen, mean, std, memory_format=torch.contiguous_format):
    """uint8 batch -> augmented, normalised float batch, ready for the model."""
    return normalize(augmented(images_uint8, aug, gen), mean, std, memory_format)


# ---------------------------------------------------------------- which normalisation a model was trained with

CANDIDATES = {  # name -> (mean, std) of the pixels scaled to [0, 1]
    "Fashion-MNIST's": (MEAN, STD),
    "MNIST's": (0.1307, 0.3081),
    "[0, 1] (no normalisation)": (0.0, 1.0),
    "[-1, 1]": (0.5, 0.5),
}
SAMPLE_IMAGES = 512  # one standard error is about 2 points: enough to tell 34% from 93%
# The rule: another candidate scores at least 30 points more than the normalisation in use (a real model
# of 93% scored 34% under the wrong one; two right ones never differ by that much).
CLEARLY_BETTER = 0.30


def given_for(normalize: tuple[float, float] | None, recorded: bool, models: int) -> tuple[float, float] | None:
    """--normalize as it applies to one of `models` files: a single model always takes it; in a set, only the
    files that record none do (a user's model beside ours)."""
    return normalize if models == 1 or not recorded else None


@torch.no_grad()
@torch.no_grad()
def compare(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
            current: tuple[float, float]) -> dict[tuple[float, float], float]:
    """{(mean, std): accuracy} for the normalisation in use and every candidate, on the first uint8 images
    (N x 1 x 28 x 28), in eval mode on the model's own device."""
    device = next(model.parameters()).device
    images, labels = images[:SAMPLE_IMAGES].to(device), labels[:SAMPLE_IMAGES].to(device)
    was_training = model.training
    model.eval()
    try:
        return {norm: (model(make_batch(images, None, None, *norm)).argmax(1) == labels).float().mean().item()
                for norm in {current, *CANDIDATES.values()}}
    finally:
        model.train(was_training)


def suggestion(scores: dict[tuple[float, float], float], current: tuple[float, float]) -> str | None:
    """One line naming a clearly better candidate by the rule above, or None."""
    best = max(scores, key=scores.get)
    if scores[best] < scores[current] + CLEARLY_BETTER:
        return None
    name = next((n for n, norm in CANDIDATES.items() if norm == best), f"mean {best[0]} std {best[1]}")
    return (f"this model looks trained with {name} normalisation: {scores[best]:.0%} with --normalize "
            f"{best[0]:g} {best[1]:g}, {scores[current]:.0%} with the one in use ({current[0]:g} {current[1]:g}) "
            f"on {SAMPLE_IMAGES} training images")
