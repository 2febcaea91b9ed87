"""A whole fine-tuning run, top to bottom: set-up, epoch 0, the epoch loop, the final test.

`fine_tune` prepares a `Run` (what every part of a run shares: config, compute settings, files, console,
data, state, TensorBoard log) and runs its epoch loop: the engine's `train_one_epoch` runs the
optimisation steps, `Run.epoch_row` validates, then `Run.record` selects, saves and logs the epoch.
"""

import copy
import dataclasses
import datetime
import math
import shlex
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import engine, model, outputs, system
from .checkpoint import (
    FORMAT,
    LoadedCheckpoint,
    load_checkpoint,
    make_checkpoint,
    require_finite,
    save_checkpoint,
    save_json,
)
from .config import Config, printable, silence
from .data import (
    CLASSES,
    DeviceData,
    Split,
    augmented,
    choose_split,
    compare,
    find_data_dir,
    fingerprint,
    label_warning,
    load_split,
    split_sets,
    suggestion,
)
from .engine import BestTracker, ComputeSettings, TrainStep, build_optimizer, build_schedulers
from .errors import DivergenceError, Interrupted, SignalGuard, UsageError, UserError, deferred, first_line
from .model import (
    NUM_CLASSES,
    apply_freezing,
    build_model,
    count_parameters,
    resolve_arch_kwargs,
    set_train_mode,
    trainable_summary,
    unwrap,
)
from .outputs import RunFiles, RunLock, check_disk_space, check_logdir, check_run_files, resumes_in_place

# ---------------------------------------------------------------- what a run prints

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
        lines.append(f"plain state_dict: {files.plain} (for model.load_state_dict(torch.load(...)) in your own "
                     "scripts)")
    return lines


# ---------------------------------------------------------------- set-up

@contextmanager
def restoring(path: str):
    """Whatever a damaged last.pt breaks while its optimizer, schedules and trackers are restored, one line
    that names the file: their types are checked at load, a bad value only by its use."""
    try:
        yield
    except (UserError, Interrupted):
        raise
    except Exception as exc:
        raise UserError(f"{path} cannot be restored ({type(exc).__name__}: {first_line(exc)}); start a new run "
                        "from its weights with --model-path instead") from None


def load_start(cfg: Config, resumed: LoadedCheckpoint | None) -> LoadedCheckpoint:
    """The model a run starts from, and its record: last.pt's on --resume, else --model-path's (with
    --normalize's values), or random weights with --from-scratch."""
    if cfg.from_scratch and resumed is None:
        system.seed_everything(cfg.seed)  # the random initial weights are part of the experiment
        kwargs = resolve_arch_kwargs(cfg.arch, cfg.arch_kwargs)
        weights = build_model(cfg.arch, kwargs).state_dict()
        return LoadedCheckpoint(None, "random weights", cfg.arch, kwargs, weights, container=FORMAT)  # no plain copy
    if resumed:  # the first run's input container: a user's plain state_dict gets its copy again (save_best)
        start = dataclasses.replace(resumed, container=resumed.meta.get("input_container", FORMAT))
    else:
        definition = model.parse(cfg.model_def) if cfg.model_def else None
        start = require_finite(load_checkpoint(cfg.model_path, trust_pickle=cfg.trust_pickle, model_def=definition,
                                               model_kwargs=cfg.model_kwargs, max_params=cfg.max_params))
        if cfg.normalize:
            start = dataclasses.replace(start, mean=cfg.normalize[0], std=cfg.normalize[1])
    if cfg.model_def and start.model_def is None:
        raise UsageError(f"--model-def: {start.path} records its own architecture ({start.arch}); drop --model-def")
    return start


def load_teachers(cfg: Config, resumed: LoadedCheckpoint | None) -> list[LoadedCheckpoint]:
    """--teacher's checkpoints, read and checked before anything is written: ours (a class of the user's
    runs only as the student, from --model-def), finite, and on --resume the files the run began with."""
    found = []
    for path in cfg.teacher or []:
        try:
            ckpt = require_finite(load_checkpoint(path, max_params=cfg.max_params, ours_only=True))
        except UserError as exc:
            raise UserError(f"--teacher: {exc}") from None
        ckpt.sha256 = model.file_sha256(path)
        found.append(ckpt)
    recorded = {r["path"]: r["sha256"] for r in (resumed.meta.get("teachers") if resumed else None) or []}
    changed = [c.path for c in found if recorded.get(str(c.path), c.sha256) != c.sha256]
    if changed and not cfg.override_resume:
        raise UsageError(f"--resume: --teacher {changed[0]} changed since the run began (its sha256 differs); "
                         "pass --override-resume to accept")
    return found


def teaching(cfg: Config, found: list[LoadedCheckpoint], split: Split, run_rt: ComputeSettings, train: DeviceData,
             console: Console) -> engine.Teachers | None:
    """The teachers on the device, each in its own memory format, after the split check: a teacher
    validated on other images may have trained on this run's validation images, which would bias the
    best-model choice. Without augmentation their targets are computed once per image."""
    if not found:
        return None
    teachers = []
    for ckpt in found:
        theirs = ckpt.split
        if split.validation != "test-half" and theirs is None:
            console.warn(f"--teacher {ckpt.path} has no record of its validation split: it may have trained on this "
                         "run's validation images")
        elif split.validation != "test-half" and not theirs.same_images(split):
            raise UsageError(f"--teacher {ckpt.path} was trained with another validation split ({theirs.describe()}; "
                             f"this run: {split.describe()}), so it may have trained on this run's validation "
                             "images: choose a teacher of this split, or validate on the test half (--val-from "
                             "test-half)")
        model = ckpt.build().eval().requires_grad_(False)
        memory_format, _ = engine.choose_memory_format(model, run_rt.device, cfg.channels_last)
        teachers.append(engine.Teacher(model.to(run_rt.device, memory_format=memory_format), ckpt.mean, ckpt.std,
                                       memory_format))
    result = engine.Teachers(teachers, cfg.kd_temperature,
                             sources=[{"path": str(c.path), "sha256": c.sha256} for c in found])
    started = time.perf_counter()
    if cfg.augment == "none":
        result.fill_cache(train.images, run_rt, cfg.eval_batch_size)
        console.print(f"teachers: their targets for {len(train)} images computed once "
                      f"({time.perf_counter() - started:.1f}s)")
    describe_targets(result, train, run_rt, console)
    return result


TARGET_SAMPLE = 1024  # training images whose targets describe the teachers, when they are not all cached
# Targets this close to uniform teach noise: the shipped ResNet-20 (trained with label smoothing 0.1) gives
# 2.20 nats at T 4 (96% of uniform's 2.30), 1.77 at T 2, 0.57 at T 1 (bench/results/distill/)
UNIFORM_SHARE = 0.9


def describe_targets(teachers: engine.Teachers, train: DeviceData, rt: ComputeSettings, console: Console) -> None:
    """How much the targets say: their mean top probability and entropy, with a warning near uniform."""
    sample = teachers.cache if teachers.cache is not None else \
        teachers.targets(augmented(train.images[:TARGET_SAMPLE], None, None), rt)
    top, entropy = sample.max(1).values.mean().item(), -(sample * sample.clamp_min(1e-12).log()).sum(1).mean().item()
    t = teachers.temperature
    console.print(f"teachers: {len(teachers.teachers)}, targets at T {t:g}: mean top probability {top:.2f}, entropy "
                  f"{entropy:.2f} nats (uniform: {math.log(NUM_CLASSES):.2f}) on {len(sample)} images")
    if entropy > UNIFORM_SHARE * math.log(NUM_CLASSES):
        console.warn(f"the teachers' targets at --kd-temperature {t:g} are almost uniform: they carry little but "
                     "noise; a lower --kd-temperature (1 or 2) keeps what the teachers know")


def load_data(cfg: Config, start: LoadedCheckpoint, device, console: Console) -> tuple[dict, Split]:
    """{train, val, test} on the device, and the split used: the starting model's unless asked otherwise."""
    train = images, labels = load_split(cfg.data_dir, "train", cfg.download)
    test = load_split(cfg.data_dir, "test", cfg.download)
    asked = Split(cfg.split_seed, cfg.val_size, fingerprint(images, labels), cfg.val_from)
    source = None if cfg.from_scratch or cfg.resume else cfg.model_path
    split, warnings = choose_split(asked, start.split, source, labels)
    sets = split_sets(train, test, split, cfg.limit_train, cfg.seed)
    split = dataclasses.replace(split, val_size=len(sets["val"][1]))
    warnings += [label_warning(sets[name][1], f"the {what} images")
                 for name, what in (("train", "training"), ("val", "validation"))]
    for warning in filter(None, warnings):
        console.warn(warning)
    console.print(f"data: {find_data_dir(cfg.data_dir, 'train')}: {len(sets['train'][1])} train, "
                  f"{len(sets['val'][1])} validation ({split.describe()}), {len(sets['test'][1])} test images")
    return {name: DeviceData.create(*pair, device) for name, pair in sets.items()}, split


def check_normalization(cfg: Config, start: LoadedCheckpoint, model: nn.Module, train: DeviceData,
                        console: Console) -> None:
    """The normalisation in use is tried against the common ones unless the file records it: training under
    one that gives near-chance accuracy while another fits would only unlearn the model. Without a record
    that stops the run; an explicit --normalize is the user's to keep, with a warning."""
    if cfg.resume or cfg.from_scratch or (start.normalize_recorded and cfg.normalize is None):
        return
    current = (start.mean, start.std)
    advice = suggestion(compare(model, train.images, train.labels, current), current)
    if advice and cfg.normalize is not None:
        console.warn(f"{advice}: is --normalize {current[0]:g} {current[1]:g} the one the model was trained with?")
    elif advice:
        raise UsageError(f"{advice}; pass --normalize MEAN STD (the one the model was trained with)")


def choose_device(cfg: Config, info: system.DistInfo) -> torch.device:
    broken = system.broken_cuda_reason() if cfg.device == "auto" else None
    if broken:  # hours on the CPU by mistake are worse than a clear stop
        raise UserError(f"{broken}; to train on the CPU anyway, pass --device cpu")
    device = system.resolve_device(cfg.device, info.local_rank if info.enabled else None)
    if cfg.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn: needs CUDA (SyncBatchNorm has no CPU implementation)")
    return device


def wrap_model(model: nn.Module, cfg: Config, rt: ComputeSettings, info: system.DistInfo) -> nn.Module:
    """Move and wrap for DDP / torch.compile; the plain model stays reachable via unwrap()."""
    model = model.to(rt.device, memory_format=rt.memory_format)
    if info.enabled:
        if cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        model = torch.compile(model)
    return model


def optimisation(cfg: Config, model: nn.Module, rt: ComputeSettings, info: system.DistInfo,
                 images: int) -> tuple[float, int, TrainStep]:
    """(the LR, steps per epoch, the step) that optimise `model` (frozen; moved and wrapped here) over `images`."""
    steps = (images // info.world_size) // cfg.batch_size
    if steps < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} x {info.world_size} process(es) is more than the "
                         f"{images} training images")
    lr = cfg.lr * info.world_size if cfg.scale_lr else cfg.lr
    model = wrap_model(model, cfg, rt, info)
    optimizer = build_optimizer(model, cfg, lr)
    step = TrainStep(
        model=model, optimizer=optimizer, schedulers=build_schedulers(optimizer, cfg, steps),
        scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.amp.use_scaler),
        label_smoothing=cfg.label_smoothing, max_grad_norm=cfg.max_grad_norm,
        ema=engine.make_ema(unwrap(model), cfg.ema_decay), ema_source=unwrap(model), kd_alpha=cfg.kd_alpha,
    )
    return lr, steps, step


def compute_settings(cfg: Config, device, start: LoadedCheckpoint, model: nn.Module, info: system.DistInfo,
                     console: Console) -> ComputeSettings:
    memory_format, why_not = engine.choose_memory_format(model, device, cfg.channels_last)
    if why_not:
        console.print(why_not)
    return ComputeSettings(device, system.resolve_amp(cfg.amp, device), start.mean, start.std, memory_format,
                           info.rank, info.world_size, tta_flip=cfg.tta == "flip")


def check_files(cfg: Config, files: RunFiles) -> Path:
    """Rank 0, before any work and without creating anything: the outputs, the inputs they may not
    replace, and the TensorBoard folder. Returns the TensorBoard run folder."""
    # On --resume, --model-path is the first run's (restored from last.pt): still an input, kept as any other.
    inputs = {"--model-path": None if cfg.from_scratch else cfg.model_path, "--resume": cfg.resume,
              **{f"--teacher {path}": path for path in cfg.teacher or []}}
    check_run_files(files, inputs=inputs, resume=cfg.resume, overwrite=cfg.overwrite)
    return check_logdir(cfg.logdir, cfg.run_name, resume=cfg.resume is not None)


def claim_outputs(cfg: Config, files: RunFiles, weights: dict, stack: ExitStack) -> None:
    """Rank 0: hold the output folder for this run alone; with --overwrite, clear the earlier run's files so
    that the folder describes one run even if this one stops early. `weights`: the starting model's."""
    weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    check_disk_space(files.best.parent, 8 * weight_bytes + 16 * 2**20)  # best + last with two AdamW moments
    stack.enter_context(RunLock(files.lock, clean=files.names()))
    if cfg.overwrite and not resumes_in_place(files, cfg.resume):
        for path in files.results():
            path.unlink(missing_ok=True)


def prepare(cfg: Config, resumed: LoadedCheckpoint | None, info: system.DistInfo, files: RunFiles,
            stack: ExitStack) -> "Run":
    """Everything checked, loaded and placed before the first step."""
    console = Console(cfg.quiet, info.is_main)
    device = choose_device(cfg, info)
    start = load_start(cfg, resumed)
    model = start.build()
    apply_freezing(model, cfg.freeze_conv, cfg.freeze_bn, cfg.trainable_patterns)  # a bad pattern: before any work
    teachers = load_teachers(cfg, resumed)
    if start.container == FORMAT:  # only a run from a plain state_dict writes one (save_best)
        files = dataclasses.replace(files, plain=None)
    log_dir = check_files(cfg, files) if info.is_main else None
    if not resumed:
        console.print(f"model: {start.describe()}")
    if info.is_main:
        claim_outputs(cfg, files, start.state_dict, stack)
    stack.callback(system.shutdown)
    system.init(info, device)
    system.configure_backends(device, cfg.deterministic)
    if device.type == "cpu":
        system.set_cpu_threads(info.local_world_size)
    with system.main_process_first(info):  # --download: one process per machine fetches, the others wait
        data, split = load_data(cfg, start, device, console)
    check_normalization(cfg, start, model, data["train"], console)
    # What only the run can know: NAME_1 when another run has NAME (last.pt keeps it, so a resume finds it
    # again), the split the data gave, and the device's evaluation batch.
    cfg = dataclasses.replace(cfg, run_name=log_dir.name if log_dir else cfg.run_name, split_seed=split.seed,
                              val_from=split.validation,
                              val_size=split.val_size if split.validation == "train" else None,
                              eval_batch_size=cfg.eval_batch_size or system.default_eval_batch_size(device))
    rt = compute_settings(cfg, device, start, model, info, console)
    lr, steps, step = optimisation(cfg, model, rt, info, len(data["train"]))
    run = Run(cfg, info, console, files, start, split, log_dir, rt, data["train"], data["val"], data["test"], lr, steps,
              step, stopper=BestTracker(cfg.monitor, cfg.patience, cfg.min_delta),
              selector=BestTracker(cfg.select, patience=0), best_state=copy.deepcopy(model.state_dict()))
    run.step.teachers = teaching(cfg, teachers, split, rt, data["train"], console)
    if resumed:
        with restoring(cfg.resume):
            run.load_state_dict(resumed.meta)
    return run


# ---------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything a run shares from its set-up to its final test. What the epoch loop changes, last.pt
    restores: see state_dict."""

    cfg: Config
    info: system.DistInfo
    console: Console
    files: RunFiles
    start: LoadedCheckpoint  # the starting model's record: arch, kwargs, user's class, input container
    split: Split
    log_dir: Path | None  # the TensorBoard run folder (rank 0)
    rt: ComputeSettings
    train: DeviceData
    val: DeviceData
    test: DeviceData
    lr: float
    steps_per_epoch: int
    step: TrainStep
    stopper: BestTracker  # --monitor: when to stop
    selector: BestTracker  # --select: which epoch is the best model
    best_state: dict
    history: list = field(default_factory=list)
    epoch: int = 0
    writer: object = None
    started: str = ""  # when the run (or this resumed part of it) began
    train_s: float | None = None  # the epoch loop's seconds, once it ended
    finished: bool = False  # metrics.json says so: a signal now says the run had finished

    def state_dict(self) -> dict:
        """What last.pt holds besides the checkpoint of its model (weights, records, config)."""
        step = self.step
        return {
            "kind": "last", "world_size": self.rt.world_size, "input_container": self.start.container,
            "epoch": self.epoch, "run_name": self.cfg.run_name, "history": self.history,
            "optimizer": step.optimizer.state_dict(), "schedulers": step.schedulers.state_dict(),
            "scaler": step.scaler.state_dict(), "early_stopping": self.stopper.state_dict(),
            "selection": self.selector.state_dict(), "best_model": self.best_state,
            "ema": step.ema.state_dict() if step.ema is not None else None,
        }

    def load_state_dict(self, meta: dict) -> None:
        """Continue exactly where last.pt stopped (RNG needs nothing: it is derived from seed and epoch)."""
        self.epoch = int(meta["epoch"])
        engine.restore_optimization(self.step, meta, self.lr, self.epoch)
        self.stopper.load_state_dict(meta["early_stopping"])
        self.selector.load_state_dict(meta.get("selection") or meta["early_stopping"])
        self.best_state = meta["best_model"]
        self.history = list(meta["history"])

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def eval_model(self) -> nn.Module:
        """What is validated, selected and saved: the moving average with --ema-decay."""
        return self.step.ema.module if self.step.ema is not None else unwrap(self.step.model)

    def begin(self) -> None:
        """Say what will run, open the log and (fine-tuning) validate the starting model as epoch 0."""
        if self.cfg.resume:
            self.console.print(f"resumed from {self.cfg.resume} at epoch {self.epoch} (run {self.cfg.run_name})")
        for line in setup_lines(self.cfg, self.rt, self.lr, unwrap(self.step.model)):
            self.console.print(line)
        self.started = datetime.datetime.now().isoformat(timespec="seconds")
        self.open_log()
        if not self.history and not self.cfg.from_scratch:
            self.record({"epoch": 0, **self.val_metrics()})  # the starting model is the first candidate

    def open_log(self) -> None:
        if not self.is_main:
            return
        self.writer = outputs.SafeWriter(str(self.log_dir))
        outputs.log_config(self.writer, self.cfg.to_dict())
        self.console.print(f"tensorboard: tensorboard --logdir {self.cfg.logdir}  (run {self.cfg.run_name})")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    # ------------------------------------------------------------ one epoch

    def start_epoch(self) -> dict:
        """Train mode (frozen layers stay as loaded) and a fresh peak-memory count; the epoch's row begun."""
        set_train_mode(unwrap(self.step.model))
        system.reset_peak_memory(self.rt.device)
        return {"epoch": self.epoch + 1, "lr": self.step.optimizer.param_groups[0]["lr"],
                "started": time.perf_counter()}

    def epoch_row(self, begun: dict, result: dict) -> dict:
        """A trained epoch's row of the history, validated."""
        seconds = time.perf_counter() - begun["started"]
        return {"epoch": begun["epoch"], "train_loss": result["loss"], "train_acc": result["acc"], "lr": begun["lr"],
                "epoch_s": seconds, "images_per_s": result["images"] / seconds,
                "peak_gpu_mb": system.peak_gpu_mb(self.rt.device), **self.val_metrics()}

    def on_sync(self, bar, received: list):
        """Called every few steps: progress, and whether any rank received a signal."""
        last_done = 0

        def sync(done, _total, loss):
            nonlocal last_done
            bar.update(done - last_done)
            bar.set_postfix(loss=f"{loss:.4f}")
            last_done = done
            return system.any_rank(bool(received), self.rt.device)

        return sync

    def val_metrics(self) -> dict:
        system.broadcast_buffers(self.eval_model)  # every rank evaluates what rank 0 saves
        metrics = engine.evaluate(self.eval_model, self.val, self.rt, self.cfg.eval_batch_size)
        if not math.isfinite(metrics["loss"]):
            raise DivergenceError(f"validation loss became {metrics['loss']} in epoch {self.epoch + 1}")
        return {"val_loss": metrics["loss"], "val_acc": metrics["acc"]}

    def record(self, row: dict) -> None:
        """Select, decide about stopping, save and log one validated epoch (0: the starting model)."""
        is_best = self.selector.update(row[self.cfg.select], row["epoch"])
        self.stopper.update(row[self.cfg.monitor], row["epoch"])
        if row["epoch"]:
            self.step.schedulers.after_epoch(row[self.cfg.monitor])
        self.history.append(row)
        self.epoch = row["epoch"]
        if is_best:  # the weights just validated: the moving average with --ema-decay
            self.best_state = copy.deepcopy(unwrap(self.eval_model).state_dict())
        if self.is_main:
            self.save(is_best)
            outputs.log_epoch(self.writer, self.epoch, row)
        self.console.print(epoch_line(row, is_best))
        if self.stopper.should_stop:
            s = self.stopper
            self.console.print(f"early stopping: {self.cfg.monitor} did not improve for {s.bad_epochs} epochs "
                               f"(best {s.best:.4f} at epoch {s.best_epoch})")

    # ------------------------------------------------------------ checkpoints and the end

    def checkpoint(self, weights: dict, metrics: dict) -> dict:
        start, teachers = self.start, self.step.teachers
        ckpt = make_checkpoint(weights, start.arch, start.arch_kwargs, normalize=(self.rt.mean, self.rt.std),
                               metrics=metrics, config=self.cfg.to_dict(), history=self.history,
                               split=self.split.to_dict(),
                               model_def=start.model_def.to_dict() if start.model_def else None)
        return {**ckpt, "teachers": teachers.sources} if teachers else ckpt

    def save_best(self, metrics: dict) -> None:
        """The best model, and for a user whose input was a plain state_dict, the same weights in the
        input's own container, under their class's key names, for their own scripts."""
        save_checkpoint(self.checkpoint(self.best_state, metrics), self.files.best)
        if self.files.plain:
            weights = {k: v.detach().cpu().contiguous() for k, v in self.best_state.items()}
            save_checkpoint(weights if self.start.container is None else {self.start.container: weights},
                            self.files.plain)

    def best_row(self) -> dict:
        return next(r for r in self.history if r["epoch"] == self.selector.best_epoch)

    def save(self, is_best: bool) -> None:
        if is_best:
            self.save_best(self.best_row())
        last = self.checkpoint(unwrap(self.step.model).state_dict(), self.history[-1])
        save_checkpoint({**last, **self.state_dict()}, self.files.last)
        save_json(self.metrics_json(finished=False), self.files.metrics)

    def metrics_json(self, finished: bool, test: dict | None = None) -> dict:
        """What metrics.json holds: the run's facts, its progress and, once finished, how it ended and the
        best model's test."""
        history = self.history
        best, epoch_s = self.best_row(), [r["epoch_s"] for r in history if "epoch_s" in r]
        peaks = [r["peak_gpu_mb"] for r in history if r.get("peak_gpu_mb") is not None]
        summary = {"started": self.started, "device": str(self.rt.device), "amp": self.rt.amp.name,
                   "world_size": self.info.world_size, "global_batch_size": self.cfg.batch_size * self.info.world_size,
                   "backend": system.backend(), "split": self.split.to_dict()}
        if finished:
            summary.update(stop_reason="early_stopping" if self.stopper.should_stop else "epochs_done",
                           train_s=self.train_s)
        summary |= {"best_epoch": best["epoch"], "epochs_run": self.epoch,
                    "best_val_loss": best["val_loss"], "best_val_acc": best["val_acc"],
                    "base_val_acc": history[0]["val_acc"] if history and history[0]["epoch"] == 0 else None,
                    "peak_gpu_mb": max(peaks) if peaks else None, "epoch_s": [round(t, 3) for t in epoch_s],
                    "history": history, **(test or {}), "finished": finished}
        if self.cfg.compile and len(epoch_s) > 1:  # the first epoch pays for compilation
            summary["compile_warmup_s"] = epoch_s[0] - statistics.median(epoch_s[1:])
        return summary

    def test_best(self) -> tuple[dict, torch.Tensor]:
        """The best weights on the test set, once, in fp32: exactly what test_model.py --full measures."""
        model = self.start.build()
        model.load_state_dict(self.best_state)
        model = model.to(self.rt.device, memory_format=self.rt.memory_format)
        single = dataclasses.replace(self.rt, amp=system.AmpPolicy(None, False), rank=0, world_size=1)
        logits = engine.predict_logits(model, self.test.images, single, self.cfg.eval_batch_size)
        loss, acc = engine.logit_metrics(logits, self.test.labels)
        return {"test_loss": loss, "test_acc": acc, "test_images": len(logits)}, logits.argmax(1)

    def finish(self) -> dict:
        """Rank 0: test the best model, store its test metrics, write metrics.json and the TB extras; the
        other ranks wait for it (the barrier), each returning its own summary."""
        if not self.is_main:
            system.barrier()  # passed once rank 0 has written metrics.json
            self.finished = True
            return self.metrics_json(finished=True)
        test, preds = self.test_best()
        test["per_class_test_acc"] = outputs.log_test_figures(self.writer, self.test.images, self.test.labels, preds,
                                                            CLASSES)
        summary = self.metrics_json(finished=True, test=test)
        outputs.log_hparams(self.writer, self.cfg.to_dict(), {"hparam/test_acc": test["test_acc"],
                                                            "hparam/best_val_acc": summary["best_val_acc"]})
        test_metrics = {k: test[k] for k in ("test_loss", "test_acc", "test_images")}
        save_checkpoint(self.checkpoint(self.best_state, {**self.best_row(), **test_metrics}), self.files.best)
        with deferred():  # a signal waits until the file and the flag agree
            save_json(summary, self.files.metrics)
            self.finished = True
        for line in summary_lines(summary, self.files):
            self.console.result(line)
        system.barrier()
        return summary


# ---------------------------------------------------------------- entry point

def fine_tune(cfg: Config, resumed: LoadedCheckpoint | None, signals: SignalGuard) -> dict:
    """Run the whole job under the caller's SignalGuard; returns the summary written to metrics.json
    (rank 0). Raises UserError, Interrupted (with the resume command, or that the run had finished) or
    DivergenceError (the best model so far stays saved)."""
    info = system.from_environment()
    files = RunFiles.for_output(cfg.output)
    run = None
    try:
        with ExitStack() as stack:
            run = prepare(cfg, resumed, info, files, stack)
            stack.callback(run.close)
            run.begin()
            loop_start = time.perf_counter()
            with signals.polled() as received:  # a signal is polled between steps: no step is torn in half
                while run.epoch < run.cfg.epochs and not run.stopper.should_stop:
                    begun = run.start_epoch()
                    with run.console.progress_bar(begun["epoch"], run.cfg.epochs, run.steps_per_epoch) as bar:
                        result = engine.train_one_epoch(run.step, run.train, begun["epoch"], run.rt, run.cfg,
                                                        run.on_sync(bar, received), stop=lambda: bool(received))
                    if not result["stopped"]:  # else the unfinished epoch is dropped: last.pt keeps the one before
                        run.record(run.epoch_row(begun, result))
                    if system.any_rank(bool(received), run.rt.device):
                        raise signals.interrupted()
            run.train_s = time.perf_counter() - loop_start
            summary = run.finish()
        if signals.received:  # a flag that came after the loop's last poll: the run finished all the same
            raise signals.interrupted()
        return summary
    except BaseException as exc:
        told = reported(exc, signals, files, cfg.model_def, started=run is not None,
                        finished=run is not None and run.finished)
        if told is exc:
            raise
        raise told from None


def reported(exc: BaseException, signals: SignalGuard, files: RunFiles, model_def: str | None,
             started: bool, finished: bool = False) -> BaseException:
    """What a failure is reported as, with how to go on (`model_def`: the --model-def that the resume command
    needs): after a signal, whatever failed (torch.save turns a signal into a RuntimeError), the interrupt."""
    if isinstance(exc, Interrupted) or signals.received:
        done = f"the run had finished: {files.metrics} holds its results"
        return Interrupted(signals.received[0] if signals.received else str(exc),
                           done if finished else resume_hint(files, model_def))
    if isinstance(exc, DivergenceError):
        return DivergenceError(f"{exc}; {kept_hint(files)}; try a lower --lr or --max-grad-norm 1.0")
    if isinstance(exc, UserError):  # a full disk while saving, say: what was saved before can go on
        if not started or isinstance(exc, UsageError):
            return exc
        return UserError(f"{exc}; {resume_hint(files, model_def)}")
    if isinstance(exc, Exception) and system.is_peer_failure(exc):
        return UserError(f"another process of the run failed ({first_line(exc, sentence=True)}); "
                         f"{resume_hint(files, model_def)}")
    return exc


def kept_hint(files: RunFiles) -> str:
    return f"the best model so far stays in {files.best}" if files.best.exists() else "nothing was saved"


def resume_hint(files: RunFiles, model_def: str | None = None) -> str:
    """The command that continues the run: a user's class is named again (a checkpoint never chooses code)."""
    if not files.last.exists():
        return "no epoch had finished, so there is nothing to resume"
    flags = ["--resume", str(files.last), *(["--model-def", model_def] if model_def else [])]
    return f"resume with: python finetune_gpu.py {shlex.join(flags)}"
