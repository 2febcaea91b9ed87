"""A whole fine-tuning run: set-up, the epoch loop, checkpoints, logs and the final test evaluation."""

import copy
import dataclasses
import datetime
import math
import os
import shutil
import signal
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distributed as dist
from . import tblog
from .checkpoint import load_checkpoint, make_checkpoint, nonfinite_tensors, save_checkpoint, save_json, unwrap
from .config import Config
from .data import AUGMENT_PRESETS, CLASSES, MEAN, STD, DeviceData, load_split, stratified_split
from .engine import (
    DivergenceError,
    EarlyStopping,
    Runtime,
    TrainStep,
    apply_freezing,
    build_optimizer,
    build_schedulers,
    evaluate,
    logit_metrics,
    make_ema,
    predict_logits,
    set_train_mode,
    train_one_epoch,
)
from .errors import Interrupted, UsageError, UserError
from .model import build_model, count_parameters, resolve_arch_kwargs
from .system import AmpPolicy, default_eval_batch_size, resolve_amp, resolve_device, seed_everything, set_cpu_threads

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Paths:
    best: Path
    last: Path
    metrics: Path

    @classmethod
    def for_output(cls, output: str) -> "Paths":
        best = Path(output)
        return cls(best, best.parent / "last.pt", best.parent / "metrics.json")


@dataclass
class Console:
    quiet: bool
    is_main: bool

    def print(self, *args) -> None:
        if self.is_main and not self.quiet:
            print(*args, flush=True)

    def result(self, *args) -> None:
        """The final summary: printed even with --quiet."""
        if self.is_main:
            print(*args, flush=True)


@dataclass
class RunState:
    """Everything the epoch loop changes, and everything last.pt must restore."""

    model: nn.Module
    arch: str
    arch_kwargs: dict
    step: TrainStep
    stopper: EarlyStopping
    best_state: dict
    history: list = field(default_factory=list)
    epoch: int = 0
    run_name: str = ""


# ---------------------------------------------------------------- signals

@contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM set a flag the training loop polls, so a step is never torn in half."""
    received: list[int] = []

    def handler(signum, _frame):
        if received:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in HANDLED_SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- set-up

def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_outputs(cfg: Config, paths: Paths) -> None:
    """Refuse, before any work and without creating anything, to overwrite the input or earlier
    results, or to write where we cannot."""
    if cfg.model_path and not cfg.from_scratch and Path(cfg.model_path).resolve() == paths.best.resolve():
        raise UsageError(f"--output {cfg.output} is the --model-path input; choose another output path")
    if not cfg.resume and not cfg.overwrite:
        for path in (paths.best, paths.last, paths.metrics):
            if path.exists():
                raise UsageError(f"--output: {path} already exists; pass --overwrite to replace it "
                                 "or choose another --output")
    folder = existing_ancestor(paths.best.parent)
    if not folder.is_dir():
        raise UserError(f"--output: cannot create a folder under {folder}: it is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--output: folder {folder} is not writable")


def check_disk_space(folder: Path, model: nn.Module) -> None:
    """Best + last (with two AdamW moments) + temporary copies, with room to spare."""
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = 8 * weight_bytes + 16 * 2**20
    free = shutil.disk_usage(existing_ancestor(folder)).free
    if free < needed:
        raise UserError(f"only {free / 2**20:.1f} MiB free in {folder}; checkpoints need about "
                        f"{needed / 2**20:.0f} MiB")


def load_data(cfg: Config, device, console: Console):
    """(train, val, test) on the device; the split is stratified and fixed by --seed."""
    images, labels = load_split(cfg.data_dir, "train", cfg.download)
    test_images, test_labels = load_split(cfg.data_dir, "test", cfg.download)
    if cfg.val_size >= len(labels):
        raise UsageError(f"--val-size {cfg.val_size} must be smaller than the {len(labels)} training images")
    train_idx, val_idx = stratified_split(labels, cfg.val_size, cfg.seed)
    if cfg.limit_train is not None:
        if cfg.limit_train > len(train_idx):
            raise UsageError(f"--limit-train {cfg.limit_train} exceeds the {len(train_idx)} training images")
        pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed))
        train_idx = train_idx[pick[: cfg.limit_train]].sort().values
    console.print(f"data: {len(train_idx)} train, {len(val_idx)} validation, {len(test_labels)} test images")
    return (DeviceData.create(images[train_idx], labels[train_idx], device),
            DeviceData.create(images[val_idx], labels[val_idx], device),
            DeviceData.create(test_images, test_labels, device))


def load_model(cfg: Config, console: Console, resume_meta: dict | None):
    """(model, arch, arch_kwargs, mean, std): from last.pt when resuming, else from --model-path,
    or a fresh one with --from-scratch."""
    if resume_meta is not None:
        arch = resume_meta["arch"]
        kwargs = resolve_arch_kwargs(arch, resume_meta["arch_kwargs"])
        model = build_model(arch, kwargs)
        model.load_state_dict(resume_meta["model"])
        norm = resume_meta["normalize"]
        return model, arch, kwargs, norm["mean"], norm["std"]
    if cfg.from_scratch:
        seed_everything(cfg.seed)  # the random initial weights are part of the experiment
        kwargs = resolve_arch_kwargs(cfg.arch)
        return build_model(cfg.arch, kwargs), cfg.arch, kwargs, MEAN, STD
    ckpt = load_checkpoint(cfg.model_path, trust_pickle=cfg.trust_pickle)
    bad = nonfinite_tensors(ckpt.state_dict)
    if bad:
        raise UserError(f"{cfg.model_path} has NaN/Inf weights in {', '.join(bad[:3])}")
    console.print(f"model: {cfg.model_path} ({ckpt.source_format}, arch {ckpt.arch})")
    return ckpt.build(), ckpt.arch, ckpt.arch_kwargs, ckpt.mean, ckpt.std


def default_run_name(cfg: Config) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    plan = cfg.preset or ("scratch" if cfg.from_scratch else "finetune")
    return f"{stamp}_{plan}_{cfg.optimizer}_lr{cfg.lr:g}_bs{cfg.batch_size}"


def wrap_model(model: nn.Module, cfg: Config, rt: Runtime, info: dist.DistInfo) -> nn.Module:
    """Freeze, move, and wrap for DDP / torch.compile; the plain model stays reachable via unwrap()."""
    apply_freezing(model, cfg.freeze_conv, cfg.freeze_bn)
    model = model.to(rt.device, memory_format=rt.memory_format)
    if info.enabled:
        if cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        model = torch.compile(model)
    return model


def build_state(cfg: Config, model, arch, arch_kwargs, rt: Runtime, steps_per_epoch: int, lr: float) -> RunState:
    optimizer = build_optimizer(model, cfg, lr)
    step = TrainStep(
        model=model, optimizer=optimizer, schedulers=build_schedulers(optimizer, cfg, steps_per_epoch),
        scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.amp.use_scaler),
        label_smoothing=cfg.label_smoothing, max_grad_norm=cfg.max_grad_norm,
        ema=make_ema(unwrap(model), cfg.ema_decay), ema_source=unwrap(model),
    )
    return RunState(
        model=model, arch=arch, arch_kwargs=arch_kwargs, step=step,
        stopper=EarlyStopping(cfg.monitor, cfg.patience, cfg.min_delta),
        best_state=copy.deepcopy(unwrap(model).state_dict()),
        run_name=cfg.run_name or default_run_name(cfg),
    )


def last_checkpoint(state: RunState, cfg: Config, rt: Runtime) -> dict:
    ckpt = make_checkpoint(state.model, state.arch, state.arch_kwargs, mean=rt.mean, std=rt.std,
                           metrics=state.history[-1] if state.history else {}, config=cfg.to_dict(),
                           history=state.history)
    ckpt.update(
        kind="last", epoch=state.epoch, run_name=state.run_name,
        optimizer=state.step.optimizer.state_dict(), schedulers=state.step.schedulers.state_dict(),
        scaler=state.step.scaler.state_dict(), early_stopping=state.stopper.state_dict(),
        best_model=state.best_state, world_size=rt.world_size,
        ema=state.step.ema.state_dict() if state.step.ema is not None else None,
    )
    return ckpt


def restore(state: RunState, resume_meta: dict, cfg: Config, lr: float) -> None:
    """Continue exactly where last.pt stopped (RNG needs nothing: it is derived from seed and epoch)."""
    unwrap(state.model).load_state_dict(resume_meta["model"])
    state.step.optimizer.load_state_dict(resume_meta["optimizer"])
    state.step.schedulers.load_state_dict(resume_meta["schedulers"])
    state.step.scaler.load_state_dict(resume_meta["scaler"])
    state.stopper.load_state_dict(resume_meta["early_stopping"])
    if state.step.ema is not None and resume_meta.get("ema") is not None:  # else it starts from the weights
        state.step.ema.load_state_dict(resume_meta["ema"])
    state.best_state = resume_meta["best_model"]
    state.history = list(resume_meta["history"])
    state.epoch = int(resume_meta["epoch"])
    state.run_name = cfg.run_name or resume_meta["run_name"]
    apply_hyperparameters(state.step, cfg, lr)


def apply_hyperparameters(step: TrainStep, cfg: Config, lr: float) -> None:
    """The optimizer state restored from last.pt carries the old LR, weight decay and momentum; the
    config (changed only with --override-resume) is what the run must use from now on."""
    scheduler = step.schedulers.per_batch
    for group, old_base in zip(step.optimizer.param_groups, scheduler.base_lrs):
        progress = group["lr"] / old_base if old_base else 1.0  # where the schedule is, as a factor
        group["initial_lr"], group["lr"] = lr, lr * progress
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    step.optimizer.param_groups[0]["weight_decay"] = cfg.resolved_weight_decay  # the decay group
    scheduler.base_lrs = [lr] * len(step.optimizer.param_groups)


def best_checkpoint(state: RunState, cfg: Config, rt: Runtime, metrics: dict) -> dict:
    model = build_model(state.arch, state.arch_kwargs)
    model.load_state_dict(state.best_state)
    return make_checkpoint(model, state.arch, state.arch_kwargs, mean=rt.mean, std=rt.std, metrics=metrics,
                           config=cfg.to_dict(), history=state.history)


# ---------------------------------------------------------------- the epoch loop

def progress_bar(console: Console, epoch: int, epochs: int, total: int):
    if console.quiet or not console.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, file=sys.stderr)


def train_epoch(state: RunState, cfg: Config, rt: Runtime, train: DeviceData, console: Console, received) -> dict:
    """Train one epoch; raises Interrupted when a signal arrived (the epoch is dropped)."""
    epoch = state.epoch + 1
    steps = (len(train) // rt.world_size) // cfg.batch_size
    bar = progress_bar(console, epoch, cfg.epochs, steps)
    last_done = 0

    def on_sync(done, _total, loss):
        nonlocal last_done
        if bar is not None:
            bar.update(done - last_done)
            bar.set_postfix(loss=f"{loss:.4f}")
            last_done = done
        return dist.any_rank(bool(received), rt.device)

    set_train_mode(unwrap(state.model), cfg.freeze_conv, cfg.freeze_bn)
    lr = state.step.optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    try:
        result = train_one_epoch(state.step, train, AUGMENT_PRESETS[cfg.augment], cfg.batch_size, cfg.seed,
                                 epoch, rt, on_sync)
    finally:
        if bar is not None:
            bar.close()
    if result["stopped"]:
        raise Interrupted(signal.Signals(received[0] if received else signal.SIGINT).name)
    seconds = time.perf_counter() - start
    return {"epoch": epoch, "train_loss": result["loss"], "train_acc": result["acc"], "lr": lr,
            "epoch_s": seconds, "images_per_s": result["images"] / seconds}


def save_epoch(state: RunState, cfg: Config, rt: Runtime, paths: Paths, is_best: bool, writer) -> None:
    if is_best:
        save_checkpoint(best_checkpoint(state, cfg, rt, state.history[-1]), paths.best)
    save_checkpoint(last_checkpoint(state, cfg, rt), paths.last)
    if writer is not None:
        tblog.log_epoch(writer, state.epoch, state.history[-1])


def epoch_line(row: dict, is_best: bool) -> str:
    return (f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  "
            f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%  lr {row['lr']:.2e}  "
            f"{row['epoch_s']:.1f}s ({row['images_per_s']:.0f} img/s)" + ("  *best" if is_best else ""))


def run_epochs(state, cfg, rt, train, val, paths, console, writer, received, eval_model) -> str:
    """Train until --epochs, early stopping or a signal; returns why it stopped."""
    while state.epoch < cfg.epochs:
        row = train_epoch(state, cfg, rt, train, console, received)
        val_metrics = evaluate(eval_model, val, rt, cfg.eval_batch_size)
        if not math.isfinite(val_metrics["loss"]):
            raise DivergenceError(f"validation loss became {val_metrics['loss']} in epoch {row['epoch']}")
        row.update(val_loss=val_metrics["loss"], val_acc=val_metrics["acc"])
        monitored = row[cfg.monitor]
        is_best = state.stopper.update(monitored, row["epoch"])
        state.step.schedulers.after_epoch(monitored)
        state.history.append(row)
        state.epoch = row["epoch"]
        if is_best:  # the weights just validated: the moving average with --ema-decay
            state.best_state = copy.deepcopy(unwrap(eval_model).state_dict())
        if console.is_main:
            save_epoch(state, cfg, rt, paths, is_best, writer)
        console.print(epoch_line(row, is_best))
        if dist.any_rank(bool(received), rt.device):
            raise Interrupted(signal.Signals(received[0] if received else signal.SIGINT).name)
        if state.stopper.should_stop:
            console.print(f"early stopping: {cfg.monitor} did not improve for {state.stopper.bad_epochs} epochs "
                          f"(best {state.stopper.best:.4f} at epoch {state.stopper.best_epoch})")
            return "early_stopping"
    return "epochs_done"


# ---------------------------------------------------------------- the end of a run

def test_best(state: RunState, rt: Runtime, test: DeviceData, batch_size: int):
    """Evaluate the best weights once on the test set: (metrics, predictions)."""
    model = build_model(state.arch, state.arch_kwargs)
    model.load_state_dict(state.best_state)
    model = model.to(rt.device, memory_format=rt.memory_format)
    # rank 0 alone, in fp32: the reported test numbers are exactly what test_model.py --full measures
    single = Runtime(rt.device, AmpPolicy(None, False), rt.mean, rt.std, rt.memory_format, tta_flip=rt.tta_flip)
    logits = predict_logits(model, test.images, single, batch_size)
    loss, acc = logit_metrics(logits, test.labels)
    return {"test_loss": loss, "test_acc": acc}, logits.argmax(1)


def finish(state: RunState, cfg: Config, rt: Runtime, test: DeviceData, paths: Paths, writer,
           summary: dict) -> dict:
    """Test the best model, store its test metrics in the checkpoint, write metrics.json and TB extras."""
    test_metrics, preds = test_best(state, rt, test, cfg.eval_batch_size)
    best_row = next(r for r in state.history if r["epoch"] == state.stopper.best_epoch)
    summary.update(best_epoch=state.stopper.best_epoch, epochs_run=state.epoch,
                   best_val_loss=best_row["val_loss"], best_val_acc=best_row["val_acc"], **test_metrics)
    if writer is not None:
        summary["per_class_test_acc"] = tblog.log_test_figures(writer, test.images, test.labels, preds, CLASSES)
        tblog.log_hparams(writer, cfg.to_dict(), {"hparam/test_acc": test_metrics["test_acc"],
                                                  "hparam/best_val_acc": best_row["val_acc"]})
    save_checkpoint(best_checkpoint(state, cfg, rt, {**best_row, **test_metrics}), paths.best)
    save_json(summary, paths.metrics)
    return summary


def runtime_for(cfg: Config, device, mean, std, info: dist.DistInfo) -> Runtime:
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return Runtime(device, resolve_amp(cfg.amp, device), mean, std, memory_format, info.rank, info.world_size,
                   tta_flip=cfg.tta == "flip")


def describe(cfg: Config, rt: Runtime, lr: float, model: nn.Module, console: Console) -> None:
    total, trainable = count_parameters(model)
    console.print(f"device: {rt.device}  amp: {rt.amp.name}  channels_last: {cfg.channels_last}  "
                  f"threads: {torch.get_num_threads() if rt.device.type == 'cpu' else '-'}  "
                  f"world size: {rt.world_size}")
    console.print(f"batch size: {cfg.batch_size} per process, {cfg.batch_size * rt.world_size} global  "
                  f"lr: {lr:g}{' (scaled by world size)' if lr != cfg.lr else ''}  optimizer: {cfg.optimizer}  "
                  f"scheduler: {cfg.scheduler}  augment: {cfg.augment}  epochs: {cfg.epochs}"
                  + (f"  ema: {cfg.ema_decay:g}" if cfg.ema_decay else ""))
    console.print(f"parameters: {total:,} ({trainable:,} trainable)  "
                  f"freeze-conv: {cfg.freeze_conv}  freeze-bn: {cfg.freeze_bn}")


# ---------------------------------------------------------------- entry point

def fine_tune(cfg: Config, resume_meta: dict | None = None) -> dict:
    """Run the whole job; returns the summary written to metrics.json (rank 0), raises UserError,
    Interrupted or DivergenceError (with the best model so far saved)."""
    info = dist.from_environment()
    console = Console(cfg.quiet, info.is_main)
    device = resolve_device(cfg.device, info.local_rank if info.enabled else None)
    if cfg.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn: needs CUDA (SyncBatchNorm has no CPU implementation)")
    if device.type == "cpu":
        set_cpu_threads(info.local_world_size)
    cfg = dataclasses.replace(cfg, eval_batch_size=cfg.eval_batch_size or default_eval_batch_size(device))
    paths = Paths.for_output(cfg.output)
    if info.is_main:
        check_outputs(cfg, paths)
    model, arch, arch_kwargs, mean, std = load_model(cfg, console, resume_meta)
    if info.is_main:
        check_disk_space(paths.best.parent, model)
    rt = runtime_for(cfg, device, mean, std, info)
    train, val, test = load_data(cfg, device, console)
    if (len(train) // info.world_size) // cfg.batch_size < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} x {info.world_size} process(es) is more than the "
                         f"{len(train)} training images (--limit-train)")
    dist.init(info, device)
    try:
        return _fine_tune(cfg, resume_meta, info, console, paths, rt, model, arch, arch_kwargs, (train, val, test))
    finally:
        dist.shutdown()


def _fine_tune(cfg, resume_meta, info, console, paths, rt, model, arch, arch_kwargs, data) -> dict:
    train, val, test = data
    lr = cfg.lr * info.world_size if cfg.scale_lr else cfg.lr
    steps_per_epoch = (len(train) // info.world_size) // cfg.batch_size
    train_model = wrap_model(model, cfg, rt, info)
    state = build_state(cfg, train_model, arch, arch_kwargs, rt, steps_per_epoch, lr)
    if state.step.ema is not None:
        eval_model = state.step.ema.module
    else:
        eval_model = unwrap(train_model) if info.enabled else train_model
    summary = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(rt.device),
               "amp": rt.amp.name, "world_size": info.world_size, "global_batch_size": cfg.batch_size * info.world_size}
    if resume_meta is not None:
        restore(state, resume_meta, cfg, lr)
        console.print(f"resumed from {cfg.resume} at epoch {state.epoch} (run {state.run_name})")
    elif info.is_main and not cfg.from_scratch:
        base, _ = test_best(state, rt, test, cfg.eval_batch_size)  # best_state is still the input model
        summary["base_test_acc"] = base["test_acc"]
        console.print(f"base model test accuracy: {100 * base['test_acc']:.2f}%")
    describe(cfg, rt, lr, unwrap(train_model), console)
    writer = open_run_log(cfg, state, console) if info.is_main else None
    try:
        train_and_report(state, cfg, rt, (train, val, test), paths, console, writer, eval_model, summary)
        dist.barrier()
        return summary
    finally:
        if writer is not None:
            writer.close()


def open_run_log(cfg: Config, state: RunState, console: Console):
    writer = tblog.open_writer(str(Path(cfg.logdir) / state.run_name))
    tblog.log_config(writer, cfg.to_dict())
    console.print(f"tensorboard: tensorboard --logdir {cfg.logdir}  (run {state.run_name})")
    return writer


def train_and_report(state, cfg, rt, data, paths, console, writer, eval_model, summary) -> None:
    """The epoch loop under the signal handlers, then (rank 0) the test evaluation and the summary."""
    train, val, test = data
    start = time.perf_counter()
    with stop_on_signals() as received:
        try:
            summary["stop_reason"] = run_epochs(state, cfg, rt, train, val, paths, console, writer,
                                                received, eval_model)
        except DivergenceError as exc:
            raise DivergenceError(divergence_message(exc, state, paths)) from None
        except Interrupted as exc:
            exc.hint = resume_hint(state, paths)
            raise
    summary["train_s"] = time.perf_counter() - start
    summary["epoch_s"] = [round(r["epoch_s"], 3) for r in state.history]
    if cfg.compile and len(summary["epoch_s"]) > 1:  # the first epoch pays for compilation
        summary["compile_warmup_s"] = summary["epoch_s"][0] - statistics.median(summary["epoch_s"][1:])
    if writer is not None:  # rank 0
        finish(state, cfg, rt, test, paths, writer, summary)
        print_summary(summary, paths, console)


def divergence_message(exc, state: RunState, paths: Paths) -> str:
    kept = (f"the best model so far (epoch {state.stopper.best_epoch}) stays in {paths.best}"
            if state.stopper.best_epoch else "no epoch finished, nothing was saved")
    return f"{exc}; stopped: {kept}; try a lower --lr or --max-grad-norm 1.0"


def resume_hint(state: RunState, paths: Paths) -> str:
    if not state.epoch:
        return "no epoch had finished, so there is nothing to resume"
    return (f"epoch {state.epoch} is saved in {paths.last} (best model: {paths.best}); "
            f"resume with: python finetune_gpu.py --resume {paths.last}")


def print_summary(summary: dict, paths: Paths, console: Console) -> None:
    base = summary.get("base_test_acc")
    console.result(
        f"done ({summary['stop_reason']}): best epoch {summary['best_epoch']} of {summary['epochs_run']}, "
        f"val acc {100 * summary['best_val_acc']:.2f}%, test acc {100 * summary['test_acc']:.2f}%"
        + (f" (base model {100 * base:.2f}%)" if base is not None else "")
        + f", {summary['train_s']:.0f}s"
        + (f" (compile warm-up about {summary['compile_warmup_s']:.0f}s)" if "compile_warmup_s" in summary else "")
    )
    console.result(f"saved: {paths.best} (best), {paths.last} (resumable), {paths.metrics}")
