"""A run's files, checked before any work: never an input, nor earlier results without --overwrite; the
TensorBoard folder and a writer that never fails the run; the lock that keeps one live run per folder."""

import fcntl
import glob
import itertools
import json
import os
import shutil
import stat
import tempfile
import threading
import warnings
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import UsageError, UserError, resolve_path

# ---------------------------------------------------------------- TensorBoard: scalars, test figures, hparams

EPOCH_SCALARS = {"train/loss": "train_loss", "train/acc": "train_acc", "val/loss": "val_loss", "val/acc": "val_acc",
                 "lr": "lr", "throughput/train_images_per_s": "images_per_s", "time/epoch_s": "epoch_s",
                 "memory/peak_gpu_mb": "peak_gpu_mb"}  # TensorBoard tag -> key of the epoch's row


class SafeWriter:
    """A SummaryWriter whose every call (writer.add_scalar(...) and the like) goes through one guard."""

    def __init__(self, logdir: str):
        self.logdir, self._writer = logdir, None
        # The writer thread re-raises its failure where no try reaches it (threading.excepthook prints a
        # traceback); the main thread's next call raises it again, and the guard reports it there.
        self._previous_hook, threading.excepthook = threading.excepthook, self._thread_hook
        try:
            from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import

            self._writer = SummaryWriter(log_dir=logdir)
        except Exception as exc:
            self._stop(exc)

    def _thread_hook(self, args) -> None:
        if not type(args.thread).__module__.startswith("tensorboard."):
            self._previous_hook(args)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.guarded(lambda writer: getattr(writer, name)(*args, **kwargs))

    def guarded(self, action) -> None:
        """action(the SummaryWriter), unless logging is off; a failure warns once and turns logging off."""
        try:
            if self._writer is not None:
                action(self._writer)
        except Exception as exc:
            self._stop(exc)

    def _stop(self, exc: Exception) -> None:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        warnings.warn(f"TensorBoard logging stopped: {reason} (in {self.logdir}); training goes on", stacklevel=3)
        for file_writer in (getattr(self._writer, "all_writers", None) or {}).values():
            with suppress(Exception):  # stop the writer threads; their last flush fails too
                file_writer.close()
        self._writer = None

    def close(self) -> None:
        self.guarded(lambda writer: writer.close())
        self._writer = None
        if threading.excepthook == self._thread_hook:
            threading.excepthook = self._previous_hook


def log_epoch(writer, epoch: int, row: dict) -> None:
    for tag, key in EPOCH_SCALARS.items():
        if row.get(key) is not None:
            writer.add_scalar(tag, row[key], epoch)
    writer.flush()


def log_config(writer, config: dict) -> None:
    writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)


def log_hparams(writer, config: dict, metrics: dict) -> None:
    """hparams in the run's own folder (SummaryWriter.add_hparams would make a sub-run)."""
    from torch.utils.tensorboard.summary import hparams

    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
    writer.guarded(lambda w: [w.file_writer.add_summary(summary) for summary in hparams(flat, metrics)])
    for key, value in metrics.items():
        writer.add_scalar(key, value, 0)


# The figures' text is in Pillow's default font: ImageDraw's own when no font is given.
def render_confusion(cm: np.ndarray, classes: list[str], cell: int = 44) -> np.ndarray:
    n, margin = len(classes), 90
    img = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(img)
    row_share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for i in range(n):
        draw.text((2, margin + i * cell + cell // 3), classes[i][:12], fill="black")
        draw.text((margin + i * cell + 2, margin - 14 - (i % 2) * 14), classes[i][:7], fill="black")
        for j in range(n):
            shade = int(255 * (1 - row_share[i, j]))
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline="gray")
            draw.text((x0 + 4, y0 + cell // 3), str(int(cm[i, j])), fill="black" if shade > 110 else "white")
    draw.text((2, 2), "rows: true class, columns: predicted", fill="black")
    return np.asarray(img)


def render_per_class(acc: list[float | None], classes: list[str], width: int = 360) -> np.ndarray:
    row = 20
    img = Image.new("RGB", (110 + width + 60, row * len(classes) + 10), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, a) in enumerate(zip(classes, acc, strict=True)):
        y = 5 + i * row
        draw.text((2, y + 3), name[:16], fill="black")
        draw.rectangle([110, y, 110 + int((a or 0) * width), y + row - 4], fill=(70, 110, 200))
        draw.text((110 + width + 6, y + 3), "n/a" if a is None else f"{100 * a:.1f}%", fill="black")
    return np.asarray(img)


def render_misclassified(images: torch.Tensor, labels, preds, classes, limit: int = 32, scale: int = 3) -> np.ndarray:
    wrong = (labels != preds).nonzero().flatten()[:limit].cpu()
    cols, tile = 8, 28 * scale
    rows = max(1, (len(wrong) + cols - 1) // cols)
    img = Image.new("RGB", (cols * (tile + 4), rows * (tile + 28)), "white")
    draw = ImageDraw.Draw(img)
    for k, i in enumerate(wrong.tolist()):
        pixels = images[i].reshape(28, 28).cpu().numpy().astype(np.uint8)
        x0, y0 = (k % cols) * (tile + 4), (k // cols) * (tile + 28)
        img.paste(Image.fromarray(pixels).resize((tile, tile), Image.NEAREST).convert("RGB"), (x0, y0))
        draw.text((x0, y0 + tile + 1), classes[int(labels[i])][:11], fill="darkgreen")
        draw.text((x0, y0 + tile + 13), "> " + classes[int(preds[i])][:9], fill="red")
    return np.asarray(img)


def log_test_figures(writer, images, labels, preds, classes) -> dict:
    """Returns per-class accuracy; a class the test set has no images of gets None (0.0 would say the model
    got all of them wrong) and no scalar."""
    n = len(classes)
    cm = torch.bincount((labels.cpu() * n + preds.cpu()).long(), minlength=n**2).reshape(n, n).numpy()
    per_class = [float(cm[i, i] / total) if total else None for i, total in enumerate(cm.sum(1))]
    for tag, image in (("test/confusion_matrix", render_confusion(cm, classes)),
                       ("test/per_class_accuracy", render_per_class(per_class, classes)),
                       ("test/misclassified", render_misclassified(images, labels, preds, classes))):
        writer.add_image(tag, image, 0, dataformats="HWC")
    for name, acc in zip(classes, per_class, strict=True):
        if acc is not None:
            writer.add_scalar(f"test_per_class/{name.replace('/', '_').replace(' ', '_')}", acc, 0)
    return dict(zip(classes, per_class, strict=True))


# ---------------------------------------------------------------- the run's files

@dataclass(frozen=True)
class RunFiles:
    """The files one run writes: the best model at --output, the others beside it."""

    best: Path
    last: Path
    metrics: Path
    lock: Path
    plain: Path | None  # the best weights as a plain state_dict; None when the input was no plain state_dict

    @classmethod
    def for_output(cls, output: str) -> "RunFiles":
        best, folder = Path(output), Path(output).parent
        if os.path.basename(output) in ("", ".", "..") or best.is_dir():
            raise UsageError(f"--output {output} names a folder; give the best model's file name, "
                             f"e.g. --output {os.path.join(output, 'model.pt')}")
        files = cls(best, folder / "last.pt", folder / "metrics.json", folder / ".lock",
                    folder / f"{best.stem}.state_dict.pt")
        if best in (files.last, files.metrics, files.lock):
            raise UsageError(f"--output {output} is where the run keeps its {best.name}; give the best model "
                             f"another name, e.g. --output {folder / 'model.pt'}")
        return files

    def results(self) -> list[Path]:
        """What the run writes through atomic_write (all but the lock): what --overwrite clears."""
        return [path for path in (self.best, self.last, self.metrics, self.plain) if path is not None]

    def names(self) -> tuple[str, ...]:
        return tuple(path.name for path in self.results())


def same_file(a: Path | int, b: Path) -> bool:
    """a (resolved, or an open descriptor) and b (resolved): the same path, or one existing file (a hard link)."""
    try:
        return a == b or os.path.samestat(os.stat(a), os.stat(b))
    except OSError:  # one of them does not exist (yet)
        return False


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if os.path.lexists(p))


def check_writable_folder(folder: Path, flag: str) -> None:
    """`folder` exists or can be created: a nameless temporary file in its nearest existing ancestor."""
    resolve_path(folder, flag)  # a loop would otherwise read as a file
    ancestor = existing_ancestor(folder)
    if not ancestor.is_dir():
        raise UsageError(f"{flag}: cannot create the folder {folder}: {ancestor} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as exc:
        raise UserError(f"{flag}: cannot write in {ancestor}: {exc.strerror}; choose another folder") from None


def check_disk_space(folder: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(existing_ancestor(folder)).free
    if free < needed_bytes:
        raise UserError(f"--output: only {free / 2**20:.1f} MiB free in {folder}; the run needs about "
                        f"{needed_bytes / 2**20:.0f} MiB")


def check_run_files(files: RunFiles, *, inputs: dict[str, Path | None], resume: Path | None,
                    overwrite: bool) -> None:
    """Only a regular file may stand where the run writes one (a symlink, a device or a folder is never
    replaced, so no planted link can redirect a write); no output is another output or an input (`inputs`:
    flag -> file, even with --overwrite); earlier results need --overwrite, unless --resume is our last.pt."""
    sources = {flag: resolve_path(path, flag) for flag, path in inputs.items() if path is not None}
    continuing = resumes_in_place(files, resume)
    for path in (*files.results(), files.lock):
        target = resolve_path(path, "--output")
        with suppress(OSError):  # absent: fine; below a file: check_writable_folder says so
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise UsageError(f"--output: {path} is not a regular file, but the run writes there; "
                                 "choose another --output")
        for flag, source in sources.items():
            if same_file(source, target) and not (continuing and flag == "--resume"):
                raise UsageError(f"--output: the run writes {path}, which is the {flag} input; an input is never "
                                 "replaced, not even with --overwrite")
    earlier = [path for path in files.results() if os.path.lexists(path)]
    if earlier and not overwrite and not continuing:
        raise UsageError(f"--output: {earlier[0]} already exists; pass --overwrite to replace it or choose another "
                         "--output")
    check_writable_folder(files.best.parent, "--output")


def resumes_in_place(files: RunFiles, resume: Path | None) -> bool:
    return resume is not None and same_file(resolve_path(Path(resume), "--resume"),
                                            resolve_path(files.last, "--output"))


def check_logdir(logdir: str, run_name: str, *, resume: bool = False) -> Path:
    """The run's folder, creating nothing: logdir/run_name, or when another run's files are there the first free
    logdir/run_name_N (as Lightning's version_N: two runs in one folder make one TensorBoard run of interleaved
    steps); a resumed run goes on in its own."""
    if not run_name.isprintable() or run_name in ("", ".", "..") or "/" in run_name:  # a `tensorboard:` line
        raise UsageError(f"--run-name {run_name!r} is not a plain folder name (one printable line, no '/')")
    resolve_path(Path(logdir), "--logdir")  # a symlink loop is refused naming the flag whose path holds it
    named = resolve_path(Path(logdir, run_name), "--run-name")
    if named.exists() and not named.is_dir():
        raise UsageError(f"--run-name {run_name}: {named} is a file; TensorBoard needs a folder")
    candidates = (Path(logdir, f"{run_name}_{n}" if n else run_name) for n in itertools.count())
    run = next(c for c in candidates if resume or not taken(c))  # ends: finitely many names exist
    check_writable_folder(run, "--logdir")  # a full disk later only stops the logging (SafeWriter)
    return run


def taken(folder: Path) -> bool:
    """Anything there but an empty folder: another run's events, a file, a link to nowhere."""
    try:
        return bool(os.listdir(folder))
    except OSError:  # absent; or a file, a link to nothing, a folder we may not list
        return os.path.lexists(folder)


# ---------------------------------------------------------------- the lock

class RunLock:
    """`with RunLock(files.lock, clean=files.names())` holds an output folder for one live run (rank 0): an
    exclusive flock, which the kernel drops however the process dies, on a file holding the holder's pid.
    It makes the output folder (the folders it made go at exit while empty); once held, it removes what a
    killed run left of the files named in `clean`."""

    def __init__(self, path: Path, clean: tuple[str, ...] = ()):
        self.path, self.clean, self._fd = Path(path), tuple(clean), None

    def __enter__(self) -> "RunLock":
        folder = self.path.parent.absolute()
        self._created = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]  # deepest first
        try:
            while self._fd is None:  # a run that ends between our open and our flock unlinks what we opened
                os.makedirs(folder, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise UserError(f"--output folder {self.path.parent} is in use by a running fine-tuning run "
                                    f"(pid {pid or '?'}); wait for it to end or choose another --output") from None
                except OSError as exc:  # a file system without flock
                    warnings.warn(f"--output: {self.path.parent} is not locked (flock: {exc.strerror}); "
                                  "nothing keeps a second run out of it", stacklevel=2)
                self._fd = fd if same_file(fd, self.path) else os.close(fd)  # closed: None, try again
        except BaseException as exc:
            self.__exit__()
            if isinstance(exc, OSError):
                raise UserError(f"--output: cannot take the lock {self.path}: {exc.strerror}") from None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        # What a run killed mid-save left of checkpoint.atomic_write's .<name>.XXXXXXXX.tmp files (up to the size
        # of last.pt each): the lock is held, so no live run writes them; one we cannot remove costs space only.
        for path in (path for name in self.clean for path in self.path.parent.glob(f".{glob.escape(name)}.?*.tmp")):
            with suppress(OSError):
                if stat.S_ISREG(path.lstat().st_mode):
                    path.unlink()
        return self

    def __exit__(self, *_exc) -> None:
        if self._fd is not None:
            with suppress(OSError):  # the folder may have gone: nothing left to release but the descriptor
                if same_file(self._fd, self.path):
                    os.unlink(self.path)
            os.close(self._fd)
            self._fd = None
        for folder in self._created:  # while empty: one that holds anything stays, and so do its parents
            with suppress(OSError):
                os.rmdir(folder)
