"""What a fine-tuning run prints: the set-up lines, a progress bar, one line per epoch, the summary.

Rank 0 alone prints. A console that goes away (`finetune_gpu.py ... | head -1`) must not stop the
training: the first broken pipe turns printing off and the run goes on writing its files.
"""

import sys
from dataclasses import dataclass

import torch

from .cli import printable, silence


@dataclass
class Console:
    quiet: bool
    is_main: bool
    alive: bool = True

    def _write(self, text: str, stream=None) -> None:
        """One line: a path in the text (--output, --logdir, --model-path) may hold a newline."""
        if self.is_main and self.alive:
            stream = stream or sys.stdout  # looked up at each call: pytest and others replace sys.stdout
            try:
                print(printable(text), file=stream, flush=True)
            except BrokenPipeError:
                self.alive = False
                silence(stream)

    def print(self, text: str) -> None:
        if not self.quiet:
            self._write(text)

    def result(self, text: str) -> None:
        """The final summary and the set-up facts a user must see: printed even with --quiet."""
        self._write(text)

    def warn(self, text: str) -> None:
        self._write(f"warning: {text}", sys.stderr)

    def progress_bar(self, epoch: int, epochs: int, total: int):
        from tqdm import tqdm

        shown = not self.quiet and self.is_main and self.alive and sys.stderr.isatty()  # elsewhere: a no-op bar
        return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, file=sys.stderr,
                    disable=not shown)


def epoch_line(row: dict, is_best: bool) -> str:
    val = f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%"
    if row["epoch"] == 0:
        line = f"epoch   0  (the starting model)  {val}"
    else:
        line = (f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  "
                f"{val}  lr {row['lr']:.2e}  {row['epoch_s']:.1f}s ({row['images_per_s']:.0f} img/s)")
        if row.get("peak_gpu_mb") is not None:
            line += f"  peak GPU {row['peak_gpu_mb']:.0f} MiB"
    return line + ("  *best" if is_best else "")


def setup_lines(cfg, rt, lr: float, model: torch.nn.Module) -> list[str]:
    from .freezing import trainable_summary
    from .model import count_parameters

    total, trainable = count_parameters(model)
    threads = torch.get_num_threads() if rt.device.type == "cpu" else "-"
    return [
        f"device: {rt.device}  amp: {rt.amp.name}  channels_last: {cfg.channels_last}  threads: {threads}  "
        f"world size: {rt.world_size}" + ("  deterministic" if cfg.deterministic else ""),
        f"batch size: {cfg.batch_size} per process, {cfg.batch_size * rt.world_size} global  "
        f"lr: {lr:g}{' (scaled by world size)' if lr != cfg.lr else ''}  optimizer: {cfg.optimizer}  "
        f"scheduler: {cfg.scheduler}  warm-up: {cfg.warmup_epochs:g} epochs  augment: {cfg.augment}  "
        f"epochs: {cfg.epochs}" + (f"  ema: {cfg.ema_decay:g}" if cfg.ema_decay else ""),
        f"selection: best {cfg.select}; early stopping: {cfg.monitor}, patience {cfg.patience}  "
        f"seeds: training {cfg.seed}, split {cfg.split_seed}",
        f"parameters: {total:,} ({trainable:,} trainable)  freeze-conv: {cfg.freeze_conv}  freeze-bn: {cfg.freeze_bn}"
        f"  input normalisation: {rt.mean:g} {rt.std:g}",
        *([trainable_summary(model)] if total != trainable else []),
    ]


def summary_lines(summary: dict, files) -> list[str]:
    best = summary["best_epoch"]
    head = (f"done ({summary['stop_reason']}): best epoch {best} of {summary['epochs_run']}, "
            f"val acc {100 * summary['best_val_acc']:.2f}%, test acc {100 * summary['test_acc']:.2f}%")
    if summary["split"]["validation"] == "test-half":
        head += f" (on the {summary['test_images']} test images that selection never saw)"
    if summary.get("base_val_acc") is not None:
        head += f" (starting model: val acc {100 * summary['base_val_acc']:.2f}%)"
    head += f", {summary['train_s']:.0f}s"
    if "compile_warmup_s" in summary:
        head += f" (compile warm-up about {summary['compile_warmup_s']:.0f}s)"
    lines = [head]
    if best == 0:
        lines.append("no epoch beat the starting model; it was kept as the best model")
    lines.append(f"saved: {files.best} (best), {files.last} (resumable), {files.metrics}")
    if files.plain:
        lines.append(f"plain state_dict: {files.plain} (for model.load_state_dict(torch.load(...)) in your own scripts)")
    return lines
