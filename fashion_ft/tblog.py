"""TensorBoard output: per-epoch scalars, and at the end test metrics, hparams, a confusion matrix,
per-class accuracy and a grid of misclassified images (drawn with Pillow, no matplotlib needed).

TensorBoard is a view of the run, never a reason to lose it: the first failure of a writer's call (a full
disk, the folder removed) is one warning, `TensorBoard logging stopped: <reason>; training goes on`, and
every later call does nothing.
"""

import contextlib
import json
import threading
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw

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
        """action(the SummaryWriter), unless logging is off; its failure warns once and turns logging off."""
        if self._writer is not None:
            try:
                action(self._writer)
            except Exception as exc:
                self._stop(exc)

    def _stop(self, exc: Exception) -> None:
        reason = (f"{exc.strerror} ({exc.filename or self.logdir})" if isinstance(exc, OSError) and exc.strerror
                  else f"{type(exc).__name__}: {exc} (writing in {self.logdir})")
        warnings.warn(f"TensorBoard logging stopped: {reason}; training goes on", stacklevel=2)
        for file_writer in (getattr(self._writer, "all_writers", None) or {}).values():
            with contextlib.suppress(Exception):  # stop the writer threads; their last flush fails too
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
