"""Training and evaluation steps, freezing, optimizer and scheduler factories, early stopping.

The hot loops keep metrics on the device and sync with the host only every `sync_every` steps
(progress, the stop flag, the finite-loss check), never per step.
"""

import copy
import fnmatch
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from .config import Config
from .data import AugmentConfig, DeviceData, batch_slices, epoch_permutation, make_batch
from .errors import DivergenceError, UserError, first_line
from .model import INPUT_SHAPE, count_parameters
from .system import CHANNELS_LAST_MPS_REASON, AmpPolicy, autocast, channels_last_ok


@dataclass
class Runtime:
    """Where and how the numbers are computed; shared by training and evaluation."""

    device: torch.device
    amp: AmpPolicy
    mean: float
    std: float
    memory_format: torch.memory_format = torch.contiguous_format
    rank: int = 0
    world_size: int = 1
    tta_flip: bool = False  # predictions averaged over each image and its mirror image



def choose_memory_format(model: nn.Module, device: torch.device, wanted: bool) -> tuple[torch.memory_format, str | None]:
    """channels_last where it is asked for and works, and why not where it does not: never on MPS, nor for
    a forward that cannot take it (`x.view(x.size(0), -1)` of a channels_last activation, common in users'
    models), which one forward of a copy on the device finds."""
    if not wanted:
        return torch.contiguous_format, None
    if not channels_last_ok(device):
        return torch.contiguous_format, CHANNELS_LAST_MPS_REASON
    probe = copy.deepcopy(model).to(device, memory_format=torch.channels_last).eval()
    x = torch.zeros(2, *INPUT_SHAPE, device=device).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            probe(x)
    except RuntimeError as exc:
        return torch.contiguous_format, (f"channels_last is off, the model runs in NCHW: its forward fails on "
                                         f"channels_last input ({first_line(exc)})")
    return torch.channels_last, None

# ---------------------------------------------------------------- freezing
#
# What --freeze-conv freezes is found, for any model, from one forward pass: the head is every layer from
# the first fully connected layer that runs after the last convolution to the output; the rest (the
# convolutions, and a BatchNorm or pooling right after the last of them) are the features.

CONV_OPS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                      "convolution", "_convolution"})
FC_OPS = frozenset({"linear", "addmm", "matmul", "mm"})  # the last three count only with a 2-D parameter
PATTERN_HINT = "name the trainable layers with --trainable PATTERN"


def _tensors(tree):
    """Every tensor in a nest of tuples, lists and dicts (a torch function's args and kwargs)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


class _OpRecorder(torch.overrides.TorchFunctionMode):
    """Records, in call order, every torch function that reads the model's parameters or buffers (by
    identity), module or functional: (function name, ids of those tensors, whether one is a matrix).
    A tensor computed from parameters alone (w.t(), a weight norm) stands for them in later calls;
    the call computing it is not an op of its own, as it touches no activation."""

    def __init__(self, ids: set[int]):
        super().__init__()
        self.ids = ids
        self.derived: dict[int, tuple[set[int], bool]] = {}
        self.keep = []  # the derived tensors, alive so that their ids are not reused
        self.ops: list[tuple[str, set[int], bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        used, matrix, activation = set(), False, False
        for t in _tensors((args, kwargs)):
            if id(t) in self.ids:
                used.add(id(t))
                matrix |= t.dim() == 2
            elif id(t) in self.derived:
                ids, _ = self.derived[id(t)]
                used |= ids
                matrix |= t.dim() == 2
            else:
                activation = True
        if used and activation:
            self.ops.append((getattr(func, "__name__", str(func)), used, matrix))
        elif used:
            for t in _tensors(out):
                self.derived[id(t)] = (used, t.dim() == 2)
                self.keep.append(t)
        return out


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def _tensor_names(model: nn.Module) -> dict[int, str]:
    """id -> name of every parameter and buffer (a tied tensor under its first name)."""
    names = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(t), name)
    return names


def _head_tensors(model: nn.Module) -> set[int]:
    """ids of the parameters and buffers of the head (see the top of this section), from one eval forward
    of two zero images; a UserError when the model has no such head or shares a tensor across it."""
    names = _tensor_names(model)
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    x = torch.zeros(2, 1, 28, 28, device=first.device if first is not None else None,
                    dtype=first.dtype if first is not None and first.is_floating_point() else None)
    flags = [(m, m.training) for m in model.modules()]
    recorder = _OpRecorder(set(names))
    try:
        with torch.no_grad(), recorder:
            model.eval()(x)
    except Exception as exc:
        raise UserError(f"cannot tell the head of this model (its forward on 2 zero images failed: "
                        f"{type(exc).__name__}: {first_line(exc)}); {PATTERN_HINT}") from None
    finally:
        for module, training in flags:
            module.training = training
    ops = recorder.ops
    convs = [i for i, (op, _, _) in enumerate(ops) if op in CONV_OPS]
    if not convs:
        raise UserError(f"cannot tell the head of this model (no convolution in its forward); {PATTERN_HINT}")
    start = next((i for i, (op, _, matrix) in enumerate(ops)
                  if i > convs[-1] and (op == "linear" or (op in FC_OPS and matrix))), None)
    if start is None:
        raise UserError("cannot tell the head of this model (no fully connected layer after its last "
                        f"convolution); {PATTERN_HINT}")
    features = set().union(*(used for _, used, _ in ops[:start]))
    head = set().union(*(used for _, used, _ in ops[start:]))
    shared = sorted(names[i] for i in features & head)
    if shared:
        raise UserError(f"cannot tell the head of this model: {', '.join(shared)} "
                        f"{'is' if len(shared) == 1 else 'are'} used both before and after its first fully "
                        f"connected layer after the convolutions; {PATTERN_HINT}")
    # a tensor the forward did not pass to a torch function (num_batches_tracked) goes with its module's
    unseen = set(names) - features - head
    for module in model.modules():
        own = {id(t) for t in _own_tensors(module)}
        if own & head:
            head |= own & unseen
    return head


def head_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters of the model's head: from the first fully connected layer that runs after
    the last convolution, to the output (cnn3 and resnet: exactly their `classifier`'s). Found from one
    eval forward of 2 zero images on the model's device, functional calls (F.conv2d(x, self.w)) included;
    the model's train/eval flags are left as they were. A UserError when there is no convolution, no
    fully connected layer after the last one, or a parameter used on both sides."""
    head = _head_tensors(model)
    return {name for name, p in model.named_parameters() if id(p) in head}


def _trainable_tensors(model: nn.Module, patterns: list[str]) -> set[int]:
    """ids of the tensors of the modules that a pattern names, directly or through an enclosing module
    ("classifier" names classifier.2 too); a tensor of the model itself, outside any module, by its own
    name. A pattern that names nothing is a UserError listing the names there are."""
    names = [name for name, _ in model.named_modules() if name]
    names += [name for name, _ in [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)]]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:24]) + (f", ... ({len(names)} in all)" if len(names) > 24 else "")
            raise UserError(f"--trainable {pattern!r} matches no layer of this model; its layers are: {shown}")

    def named(name: str) -> bool:  # the name or an enclosing module's
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:k]), p) for k in range(1, len(parts) + 1) for p in patterns)

    kept = set()
    for name, module in model.named_modules():
        for tname, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if named(name or tname):
                kept.add(id(t))
    return kept


def _frozen_tensors(model: nn.Module, freeze_conv: bool, freeze_bn: bool, trainable=None) -> set[int]:
    """ids of the parameters and buffers that stay exactly as loaded."""
    everything = set(_tensor_names(model))
    frozen = set()
    if freeze_conv:  # every tensor outside the head: features' weights and BatchNorm statistics
        frozen |= everything - _head_tensors(model)
    if freeze_bn:  # BatchNorm1d/2d/3d and SyncBatchNorm: statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                frozen |= {id(t) for t in _own_tensors(m)}
    if trainable:
        frozen |= everything - _trainable_tensors(model, list(trainable))
    return frozen


def frozen_modules(model: nn.Module, freeze_conv: bool, freeze_bn: bool, trainable=None) -> list[nn.Module]:
    """Modules whose own parameters and running statistics all stay exactly as loaded: with freeze_conv
    every one outside the head (head_parameters), with freeze_bn every BatchNorm, and with `trainable`
    (fnmatch patterns over module names, e.g. ["fc*", "bn_fc"]) every one that no pattern names (a
    pattern names a module and everything in it)."""
    frozen = _frozen_tensors(model, freeze_conv, freeze_bn, trainable)
    return [m for m in model.modules() if (own := _own_tensors(m)) and all(id(t) in frozen for t in own)]


def apply_freezing(model: nn.Module, freeze_conv: bool, freeze_bn: bool, trainable=None) -> None:
    frozen = _frozen_tensors(model, freeze_conv, freeze_bn, trainable)
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, freeze_conv: bool, freeze_bn: bool, trainable=None) -> None:
    """model.train(), except that every module holding frozen buffers (BatchNorm's running statistics)
    stays in eval mode, so that they do not move. Only that module's own flag: its children, and layers
    without tensors (dropout), follow model.train()."""
    frozen = _frozen_tensors(model, freeze_conv, freeze_bn, trainable)
    model.train()
    for m in model.modules():
        if any(id(b) in frozen for b in m.buffers(recurse=False)):
            m.training = False


def trainable_summary(model: nn.Module, limit: int = 8) -> str:
    """One line: the fewest modules that together hold every trainable parameter (a module whose
    parameters are all trainable stands for its children), and the counts, e.g.
    "trainable: fc1, bn_fc, fc2 (4,522 of 6,000 parameters)"."""
    names = []

    def visit(module: nn.Module, prefix: str) -> None:
        params = list(module.parameters())
        if params and all(p.requires_grad for p in params):
            names.append(prefix or "all")
            return
        names.extend(f"{prefix}.{n}" if prefix else n
                     for n, p in module.named_parameters(recurse=False) if p.requires_grad)
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name)

    visit(model, "")
    total, trained = count_parameters(model)
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"trainable: {shown or 'nothing'} ({trained:,} of {total:,} parameters)"


def check_batch_for_batchnorm1d(model: nn.Module, batch: int) -> None:
    """A UserError for a training batch of one image through a BatchNorm1d in training mode: BatchNorm needs
    more than one value per channel (torch would stop with a ValueError in the middle of the forward)."""
    if batch > 1:
        return
    layers = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm1d) and m.training]
    if layers:
        raise UserError(f"a training batch of one image cannot train BatchNorm1d {', '.join(layers)} (it needs "
                        "at least 2 images per batch): use --batch-size 2 or more, or freeze it (--freeze-bn)")


# ---------------------------------------------------------------- optimizer and schedulers

def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """Only trainable parameters; no weight decay on biases and normalisation parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    if not decay and not no_decay:
        raise UserError("nothing to train: every parameter is frozen")
    groups = [
        {"params": decay, "weight_decay": cfg.resolved_weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused_adamw_supported(decay + no_decay) else None)


def fused_adamw_supported(params) -> bool:
    """The fused AdamW kernel (one launch for every parameter instead of several per tensor): CUDA
    since torch 2.0 (this project needs 2.4) for float64/32/16 and bfloat16 parameters. Elsewhere
    torch's default (foreach) stays, as before."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    # None (a Config not resolved by the CLI, as in the benchmark): no warm-up
    return int(round((cfg.warmup_epochs or 0.0) * steps_per_epoch))


def lr_multiplier(cfg: Config, steps_per_epoch: int):
    """step -> factor on the base LR, for every scheduler stepped per batch (plateau: warm-up only)."""
    total = cfg.epochs * steps_per_epoch
    warmup = warmup_steps(cfg, steps_per_epoch)
    floor = cfg.min_lr / cfg.lr

    def cosine(t):  # t in [0, 1]
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        epoch = step // steps_per_epoch
        if cfg.scheduler == "cosine":
            return cosine((step - warmup) / max(1, total - warmup))
        if cfg.scheduler == "step":
            return cfg.step_gamma ** (epoch // cfg.step_size)
        if cfg.scheduler == "exponential":
            return cfg.exp_gamma ** epoch
        if cfg.scheduler == "onecycle":  # torch's OneCycleLR shape: 1/25 -> 1 over 30%, then -> 1/25e4
            peak = int(0.3 * total)
            if step < peak:
                return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * step / max(1, peak)))
            end = 1 / 25e4
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * (step - peak) / max(1, total - peak)))
        return 1.0  # none, plateau

    return factor


@dataclass
class Schedulers:
    per_batch: torch.optim.lr_scheduler.LambdaLR
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    warmup_steps: int
    steps_per_epoch: int = 1

    def after_batch(self, step: int) -> None:
        # plateau owns the LR after warm-up; stepping the LambdaLR then would undo its reductions
        if self.plateau is None or step < self.warmup_steps:
            self.per_batch.step()

    def after_epoch(self, monitored: float) -> None:
        if self.plateau is not None and self.per_batch.last_epoch >= self.warmup_steps:
            self.plateau.step(monitored)

    def state_dict(self) -> dict:
        return {
            "per_batch": self.per_batch.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
        }

    def restore(self, state: dict, epochs_done: int, lr: float) -> None:
        """Continue at the start of epoch `epochs_done + 1` of THIS run's schedule (its own steps per
        epoch: the world size or batch size may have changed) with base LR `lr` (may be overridden).

        The saved step counter counts the old run's steps, so it is not reused. The optimizer's
        saved state must be loaded first: after warm-up, plateau's reductions are read from its LR."""
        groups = self.per_batch.optimizer.param_groups
        position = epochs_done * self.steps_per_epoch
        factors = [self.per_batch.lr_lambdas[0](position)] * len(groups)
        if self.plateau is not None:
            if state.get("plateau"):
                self.plateau.load_state_dict(state["plateau"])
            if position >= self.warmup_steps:  # plateau owns the LR: keep the reductions it made
                old_bases = state["per_batch"]["base_lrs"]
                factors = [g["lr"] / base if base else 1.0 for g, base in zip(groups, old_bases)]
        for group, factor in zip(groups, factors):
            group["initial_lr"], group["lr"] = lr, lr * factor
        self.per_batch.base_lrs = [lr] * len(groups)
        self.per_batch.last_epoch = position
        self.per_batch._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports
        if self.plateau is not None:
            self.plateau._last_lr = [g["lr"] for g in groups]


def build_schedulers(optimizer, cfg: Config, steps_per_epoch: int) -> Schedulers:
    per_batch = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, steps_per_epoch))
    plateau = None
    if cfg.scheduler == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min" if cfg.monitor == "val_loss" else "max",
            factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            threshold=cfg.min_delta, threshold_mode="abs",  # the same "improvement" as early stopping
        )
    return Schedulers(per_batch, plateau, warmup_steps(cfg, steps_per_epoch), steps_per_epoch)


# ---------------------------------------------------------------- early stopping

@dataclass
class EarlyStopping:
    monitor: str
    patience: int
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.monitor == "val_loss":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's monitored value; True when it is the new best."""
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


# ---------------------------------------------------------------- train and evaluate

@dataclass
class TrainStep:
    """What one optimisation step needs besides the batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedulers: Schedulers
    scaler: torch.amp.GradScaler
    label_smoothing: float
    max_grad_norm: float | None
    ema: "ModelEma | None" = None  # updated from ema_source, the plain model, after every step
    ema_source: nn.Module | None = None

    def __call__(self, x, y, rt: Runtime):
        check_batch_for_batchnorm1d(self.model, len(x))
        with autocast(rt.device, rt.amp):
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedulers.after_batch(self.schedulers.per_batch.last_epoch)
        if self.ema is not None:
            self.ema.update(self.ema_source)
        return loss.detach(), logits.detach()


class ModelEma:
    """An exponential moving average of a model's weights and floating-point buffers (BatchNorm
    statistics); integer buffers (num_batches_tracked) are copied. `module` is the averaged copy.

    The same numbers as torch's AveragedModel with get_ema_multi_avg_fn and use_buffers=True, but the
    update count is a Python int: AveragedModel keeps it in a CPU tensor that it copies to the GPU at
    every step, a host-device transfer and sync per step. The first update copies the model, so the
    EMA may be created before a resume loads the weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()],
                         [*model.parameters(), *model.buffers()], strict=True))
        floats = [(a, m.detach()) for a, m in pairs if a.is_floating_point()]
        copied = pairs if self.updates == 0 else [(a, m) for a, m in pairs if not a.is_floating_point()]
        if self.updates and floats:  # multi-tensor kernels on the device; the count stays on the host
            torch._foreach_lerp_([a for a, _ in floats], [m for _, m in floats], 1.0 - self.decay)
        for averaged, current in copied:
            averaged.copy_(current)
        self.updates += 1

    def state_dict(self) -> dict:
        """AveragedModel's layout (names to tensors): last.pt files of either load into both."""
        state = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        state["n_averaged"] = torch.tensor(self.updates, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict({k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"})
        self.updates = int(state["n_averaged"])


def make_ema(model: nn.Module, decay: float) -> ModelEma | None:
    """The moving average of `model` (None when decay is 0)."""
    return ModelEma(model, decay) if decay else None


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: Config) -> None:
    """A restored optimizer carries the saved weight decay and momentum; the config (changed only with
    --override-resume) is what the run uses from now on. The LR is the schedules' (Schedulers.restore)."""
    for group in optimizer.param_groups:
        if "momentum" in group:
            group["momentum"], group["nesterov"] = cfg.momentum, cfg.momentum > 0
    optimizer.param_groups[0]["weight_decay"] = cfg.resolved_weight_decay  # the decay group (build_optimizer)


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping this run's implementation (fused AdamW on CUDA, foreach
    elsewhere): the saved groups would bring the saving machine's, and the step counters follow it
    (on the parameter's device for fused and capturable, on the CPU otherwise)."""
    chosen = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, chosen):
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim():  # else step 1 fails, in torch's words
                    if value.shape != p.shape:
                        raise ValueError(f"optimizer state {name!r} has shape {tuple(value.shape)} for a parameter "
                                         f"of shape {tuple(p.shape)}")
                    # a file may hold an expanded (stride-0) tensor: the in-place update needs its own memory
                    optimizer.state[p][name] = value.clone(memory_format=torch.preserve_format)
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(device=p.device if on_device else "cpu", dtype=torch.float32)


def restore_optimization(step: TrainStep, meta: dict, cfg: Config, lr: float, epochs_done: int) -> None:
    """Optimizer, schedules, GradScaler and EMA from a last.pt, continued under this run's settings:
    the LR schedule at `epochs_done` epochs of this run's steps per epoch with base LR `lr`, and the
    config's weight decay and momentum."""
    load_optimizer_state(step.optimizer, meta["optimizer"])
    step.schedulers.restore(meta["schedulers"], epochs_done, lr)
    if meta.get("scaler"):  # empty when the saved run had no fp16 scaler (CPU, bf16): load_state_dict({}) raises
        step.scaler.load_state_dict(meta["scaler"])
    if step.ema is not None and meta.get("ema") is not None:  # else it starts from the weights
        step.ema.load_state_dict(meta["ema"])
    apply_hyperparameters(step.optimizer, cfg)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Dropout and augmentation randomness as a function of (seed, epoch, rank): resume is exact."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63)


def rank_shard(perm: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Every rank gets the same number of images: the remainder of the permutation is dropped."""
    usable = len(perm) - len(perm) % world_size
    return perm[:usable][rank::world_size]


def check_finite_loss(mean_loss: torch.Tensor, epoch: int, step: int, rank: int) -> float:
    """This rank's mean loss, after checking every rank's: all ranks raise DivergenceError together,
    naming the ranks whose loss is NaN/Inf (a rank stopping alone would leave the others waiting in
    the next collective until the timeout)."""
    losses = dist.per_rank(mean_loss)
    bad = [r for r, value in enumerate(losses) if not math.isfinite(value)]
    if bad:
        where = f" on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}" if len(losses) > 1 else ""
        raise DivergenceError(f"loss became {losses[bad[0]]} in epoch {epoch} (step {step}){where}")
    return losses[rank]


@dataclass(frozen=True)
class TrainData:
    """What every epoch of a run draws its batches from."""

    data: DeviceData
    aug: AugmentConfig | None
    batch_size: int
    seed: int
    sync_every: int = 25  # steps between host syncs (progress, the stop flag, the finite-loss check)


def train_one_epoch(step: TrainStep, train: TrainData, epoch: int, rt: Runtime, on_sync=None) -> dict:
    """One pass over this rank's shard. on_sync(done, total, loss) may return True to stop early."""
    data, aug, batch_size, seed, sync_every = train.data, train.aug, train.batch_size, train.seed, train.sync_every
    torch.manual_seed(epoch_seed(seed, epoch, rt.rank))
    gen = torch.Generator(device=rt.device).manual_seed(epoch_seed(seed, epoch, rt.rank))
    shard = rank_shard(epoch_permutation(len(data), seed, epoch, rt.device), rt.rank, rt.world_size)
    slices = list(batch_slices(len(shard), batch_size, drop_last=True))
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen, stopped = 0, False
    for i, sl in enumerate(slices, 1):
        idx = shard[sl]
        x = make_batch(data.images[idx], aug, gen, rt.mean, rt.std, rt.memory_format)
        y = data.labels[idx]
        loss, logits = step(x, y, rt)
        loss_sum += loss.float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if i % sync_every == 0 or i == len(slices):
            mean_loss = check_finite_loss(loss_sum / seen, epoch, i, rt.rank)
            if on_sync is not None and on_sync(i, len(slices), mean_loss):
                stopped = True
                break
    totals = dist.all_reduce_sum(torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=rt.device)]))
    return {"loss": (totals[0] / totals[2]).item(), "acc": (totals[1] / totals[2]).item(), "stopped": stopped,
            "images": int(totals[2].item())}


@torch.inference_mode()
def predict_logits(model: nn.Module, images_uint8: torch.Tensor, rt: Runtime, batch_size: int) -> torch.Tensor:
    """fp32 logits for every image (uint8 N x 1 x 28 x 28), in large batches, without augmentation.

    With `rt.tta_flip` they are the log of the probabilities averaged over the image and its mirror
    image: still logits (softmax gives those averaged probabilities back), so every metric applies.
    """
    model.eval()
    out = []
    for sl in batch_slices(len(images_uint8), batch_size, drop_last=False):
        x = make_batch(images_uint8[sl], None, None, rt.mean, rt.std, rt.memory_format)
        with autocast(rt.device, rt.amp):
            logits = model(x).float()
            if rt.tta_flip:
                mirrored = model(x.flip(3)).float()
                # log((p + q) / 2) in log space: a probability that underflows to 0 would give -inf
                logits = torch.logaddexp(logits.log_softmax(1), mirrored.log_softmax(1)) - math.log(2)
        out.append(logits)
    return torch.cat(out) if out else torch.empty(0, 10, device=rt.device)


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of fp32 logits: the numbers both scripts report for a test set."""
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def evaluate(model: nn.Module, data: DeviceData, rt: Runtime, batch_size: int) -> dict:
    """Loss (plain cross-entropy) and accuracy over `data`, sharded across ranks and all-reduced."""
    idx = torch.arange(len(data), device=rt.device)[rt.rank::rt.world_size]  # every image once
    logits = predict_logits(model, data.images[idx], rt, batch_size)
    labels = data.labels[idx]
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(1) == labels).sum().float()
    totals = dist.all_reduce_sum(torch.stack([loss_sum, correct, torch.tensor(float(len(idx)), device=rt.device)]))
    return {"loss": (totals[0] / totals[2]).item(), "acc": (totals[1] / totals[2]).item()}
