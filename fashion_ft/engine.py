"""Training and evaluation: the optimizer and its LR schedules, the best-epoch trackers, the step (with
distillation's loss), the moving average, one epoch, predictions and metrics.

The hot loops keep metrics on the device and sync with the host every `SYNC_EVERY` steps (progress, the
finite-loss check, and under torchrun the stop flag the ranks agree on). Per step only fp16's GradScaler syncs
(it reads whether the gradients were finite); a single process reads its stop flag, a host value, after every step.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import system
from .config import Config
from .data import AUGMENT_PRESETS, DeviceData, augmented, batch_slices, epoch_permutation, make_batch, normalize
from .errors import DivergenceError, UserError, first_line
from .model import INPUT_SHAPE
from .system import CHANNELS_LAST_MPS_REASON, AmpPolicy, autocast, channels_last_ok

# ---------------------------------------------------------------- the optimizer and its LR schedules

def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """Only trainable parameters; no weight decay on biases and normalisation parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.resolved_weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, fused=True if fused_adamw_supported(params) else None)


def fused_adamw_supported(params) -> bool:
    """The fused AdamW kernel (one launch for every parameter instead of several per tensor) takes float64/32/16
    and bfloat16 parameters on CUDA (torch >= 2.0; this project needs 2.4). Elsewhere torch's default (foreach)."""
    return all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    # None (a Config not resolved by the CLI, as in the benchmark): no warm-up
    return int(round((cfg.warmup_epochs or 0.0) * steps_per_epoch))


def lr_multiplier(cfg: Config, steps_per_epoch: int):
    """step -> factor on the base LR, for every scheduler stepped per batch (plateau: warm-up only)."""
    total, warmup, floor = cfg.epochs * steps_per_epoch, warmup_steps(cfg, steps_per_epoch), cfg.min_lr / cfg.lr
    peak = int(0.3 * total)  # onecycle, torch's OneCycleLR shape: 1/25 -> 1 over 30% of the steps, then -> 1/25e4

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "cosine":
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if cfg.scheduler == "step":
            return cfg.step_gamma ** (step // steps_per_epoch // cfg.step_size)
        if cfg.scheduler == "exponential":
            return cfg.exp_gamma ** (step // steps_per_epoch)
        if cfg.scheduler == "onecycle" and step < peak:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * step / max(1, peak)))
        if cfg.scheduler == "onecycle":
            return 1 / 25e4 + (1 - 1 / 25e4) * 0.5 * (1 + math.cos(math.pi * (step - peak) / max(1, total - peak)))
        return 1.0  # none, plateau

    return factor


@dataclass
class Schedulers:
    per_batch: torch.optim.lr_scheduler.LambdaLR
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    warmup_steps: int
    steps_per_epoch: int = 1

    def after_batch(self) -> None:
        # plateau owns the LR after warm-up; stepping the LambdaLR then would undo its reductions
        if self.plateau is None or self.per_batch.last_epoch < self.warmup_steps:
            self.per_batch.step()

    def after_epoch(self, monitored: float) -> None:
        if self.plateau is not None and self.per_batch.last_epoch >= self.warmup_steps:
            self.plateau.step(monitored)

    def state_dict(self) -> dict:
        return {"per_batch": self.per_batch.state_dict(), "plateau": self.plateau and self.plateau.state_dict()}

    def restore(self, state: dict, saved_lrs: list[float], epochs_done: int, lr: float) -> None:
        """Continue at the start of epoch `epochs_done + 1` of THIS run's schedule with base LR `lr` (may be
        overridden): the saved step counter counts the old run's steps, whose world or batch size may differ.
        After warm-up, plateau's reductions are the saved optimizer's LRs over the saved base LRs."""
        groups, position = self.per_batch.optimizer.param_groups, epochs_done * self.steps_per_epoch
        factors = [self.per_batch.lr_lambdas[0](position)] * len(groups)
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
        if self.plateau is not None and position >= self.warmup_steps:  # plateau owns the LR: keep its reductions
            factors = [old / base for old, base in zip(saved_lrs, state["per_batch"]["base_lrs"])]
        for group, factor in zip(groups, factors):
            group["lr"] = lr * factor
        self.per_batch.base_lrs, self.per_batch.last_epoch = [lr] * len(groups), position


def build_schedulers(optimizer, cfg: Config, steps_per_epoch: int) -> Schedulers:
    per_batch = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, steps_per_epoch))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min" if cfg.monitor == "val_loss" else "max", factor=cfg.plateau_factor,
        patience=cfg.plateau_patience, threshold=cfg.min_delta, threshold_mode="abs",  # early stopping's improvement
    ) if cfg.scheduler == "plateau" else None
    return Schedulers(per_batch, plateau, warmup_steps(cfg, steps_per_epoch), steps_per_epoch)


# ---------------------------------------------------------------- the best epoch

@dataclass
class BestTracker:
    """The best value of one validation metric so far, and the epochs since: --select's picks the best
    model, --monitor's stops the run after `patience` epochs without improvement."""

    monitor: str
    patience: int
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's monitored value; True when it is the new best (by more than min_delta)."""
        better = self.best is None or (value < self.best - self.min_delta if self.monitor == "val_loss"
                                       else value > self.best + self.min_delta)
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


@dataclass
class ComputeSettings:
    """Where and how a batch is computed: device, precision, input normalisation, memory layout, this
    process's shard of the data, flip TTA; shared by training and evaluation."""

    device: torch.device
    amp: AmpPolicy
    mean: float
    std: float
    memory_format: torch.memory_format = torch.contiguous_format
    rank: int = 0
    world_size: int = 1
    tta_flip: bool = False  # predictions averaged over each image and its mirror image


def choose_memory_format(model: nn.Module, device: torch.device,
                         wanted: bool) -> tuple[torch.memory_format, str | None]:
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


# ---------------------------------------------------------------- train and evaluate

@dataclass
class Teacher:
    model: nn.Module  # eval mode, no gradients, on the device in its own memory format
    mean: float  # the normalisation it was trained with
    std: float
    memory_format: torch.memory_format = torch.contiguous_format


@dataclass
class Teachers:
    """What a student distils from (--teacher): the mean of the teachers' softmax at `temperature`, each
    teacher on the batch normalised its own way, under the student's autocast. Without augmentation an
    image's targets never change: `cache` holds those of every training image, computed once."""

    teachers: list[Teacher]
    temperature: float
    sources: list[dict]  # [{path, sha256}], recorded in the checkpoints: a resume checks the files
    cache: torch.Tensor | None = None

    @torch.no_grad()
    def targets(self, x01: torch.Tensor, rt: ComputeSettings) -> torch.Tensor:
        """fp32 target probabilities of a batch in [0, 1] (x01 itself is left as it is)."""
        with autocast(rt.device, rt.amp):
            probs = [(t.model(normalize(x01.clone(), t.mean, t.std, t.memory_format)).float() / self.temperature)
                     .softmax(1) for t in self.teachers]
        return torch.stack(probs).mean(0)

    def for_batch(self, idx: torch.Tensor, x01: torch.Tensor, rt: ComputeSettings) -> torch.Tensor:
        """The targets of training images `idx`, whose batch in [0, 1] is x01: cached, or computed now."""
        return self.cache[idx] if self.cache is not None else self.targets(x01, rt)

    def fill_cache(self, images_uint8: torch.Tensor, rt: ComputeSettings, batch_size: int) -> None:
        self.cache = torch.cat([self.targets(augmented(images_uint8[sl], None, None), rt)
                                for sl in batch_slices(len(images_uint8), batch_size, drop_last=False)])


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
    teachers: Teachers | None = None  # distillation: targets for every batch, weighted by kd_alpha
    kd_alpha: float = 0.0

    def __call__(self, x, y, rt: ComputeSettings, targets: torch.Tensor | None = None):
        with autocast(rt.device, rt.amp):
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
            if targets is not None:  # Hinton et al.: T^2 keeps the soft term's gradients at the hard term's scale
                t = self.teachers.temperature
                kd = F.kl_div(F.log_softmax(logits.float() / t, 1), targets, reduction="batchmean") * t * t
                loss = (1 - self.kd_alpha) * loss + self.kd_alpha * kd
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedulers.after_batch()
        if self.ema is not None:
            self.ema.update(self.ema_source)
        return loss.detach(), logits.detach()


class ModelEma:
    """An exponential moving average of a model's weights and floating-point buffers (BatchNorm statistics);
    integer buffers (num_batches_tracked) are copied. `module` is the averaged copy. The numbers of torch's
    AveragedModel with get_ema_multi_avg_fn and use_buffers=True, but the update count is a Python int:
    AveragedModel keeps it in a CPU tensor that it copies to the GPU at every step, a host-device transfer and
    sync per step. The first update copies the model, so the EMA may be created before a resume loads weights."""

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


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The saved moments and step counters under this run's group settings: the config's weight decay and momentum
    (changed only with --override-resume) and this machine's kernel (fused AdamW on CUDA, else foreach), for which
    torch places the step counters. The LR is the schedules' (Schedulers.restore)."""
    groups = [{**mine, "params": saved["params"]}
              for mine, saved in zip(optimizer.param_groups, state["param_groups"], strict=True)]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for p, values in optimizer.state.items():
        for name, value in values.items():
            if torch.is_tensor(value) and value.dim():  # else step 1 fails, in torch's words
                if value.shape != p.shape:
                    raise ValueError(f"optimizer state {name!r} has shape {tuple(value.shape)} for a parameter "
                                     f"of shape {tuple(p.shape)}")
                # a file may hold an expanded (stride-0) tensor: the in-place update needs its own memory
                values[name] = value.clone(memory_format=torch.preserve_format)


def restore_optimization(step: TrainStep, meta: dict, lr: float, epochs_done: int) -> None:
    """Optimizer, schedules, GradScaler and EMA from a last.pt, continued under this run's settings: the LR
    schedule at `epochs_done` epochs of this run's steps with base LR `lr`, the optimizer's as built."""
    load_optimizer_state(step.optimizer, meta["optimizer"])
    step.schedulers.restore(meta["schedulers"], [g["lr"] for g in meta["optimizer"]["param_groups"]], epochs_done, lr)
    if meta.get("scaler"):  # empty when the saved run had no fp16 scaler (CPU, bf16): load_state_dict({}) raises
        step.scaler.load_state_dict(meta["scaler"])
    if step.ema is not None and meta.get("ema") is not None:  # else it starts from the weights
        step.ema.load_state_dict(meta["ema"])


def rank_shard(perm: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Every rank gets the same number of images: the remainder of the permutation is dropped."""
    return perm[:len(perm) - len(perm) % world_size][rank::world_size]


def check_finite_loss(mean_loss: torch.Tensor, epoch: int, step: int, rank: int) -> float:
    """This rank's mean loss, after checking every rank's: all ranks raise DivergenceError together,
    naming the ranks whose loss is NaN/Inf (a rank stopping alone would leave the others waiting in
    the next collective until the timeout)."""
    losses = system.per_rank(mean_loss)
    bad = [r for r, value in enumerate(losses) if not math.isfinite(value)]
    if bad:
        where = f" on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}" if len(losses) > 1 else ""
        raise DivergenceError(f"loss became {losses[bad[0]]} in epoch {epoch} (step {step}){where}")
    return losses[rank]


SYNC_EVERY = 25  # steps between host syncs (progress, the finite-loss check, torchrun's stop flag)


def train_one_epoch(step: TrainStep, data: DeviceData, epoch: int, rt: ComputeSettings, cfg: Config, on_sync=None,
                    sync_every: int = SYNC_EVERY, stop: Callable[[], bool] | None = None) -> dict:
    """One pass over this rank's shard of `data`, in batches drawn as `cfg` says (--augment, --batch-size,
    --seed). on_sync(done, total, loss) may return True to stop early; so may stop(), which a single process
    asks after every step (the ranks of a distributed run must stop at the same step: on_sync decides)."""
    poll = stop if rt.world_size == 1 else None
    aug = AUGMENT_PRESETS[cfg.augment]
    seed = (cfg.seed * 1_000_003 + epoch * 1009 + rt.rank) % (2**63)  # dropout and augmentation: resume is exact
    torch.manual_seed(seed)
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    shard = rank_shard(epoch_permutation(len(data), cfg.seed, epoch, rt.device), rt.rank, rt.world_size)
    slices = list(batch_slices(len(shard), cfg.batch_size, drop_last=True))
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen, stopped = 0, False
    for i, sl in enumerate(slices, 1):
        idx = shard[sl]
        x01 = augmented(data.images[idx], aug, gen)
        targets = step.teachers.for_batch(idx, x01, rt) if step.teachers is not None else None
        x = normalize(x01, rt.mean, rt.std, rt.memory_format)
        y = data.labels[idx]
        loss, logits = step(x, y, rt, targets)
        loss_sum += loss.float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if i % sync_every == 0 or i == len(slices):
            mean_loss = check_finite_loss(loss_sum / seen, epoch, i, rt.rank)
            stopped = on_sync is not None and bool(on_sync(i, len(slices), mean_loss))
        if stopped or (poll is not None and poll()):
            stopped = True
            break
    seen_t = torch.tensor(float(seen), device=rt.device)
    totals = system.all_reduce_sum(torch.stack([loss_sum, correct.float(), seen_t]))
    return {"loss": (totals[0] / totals[2]).item(), "acc": (totals[1] / totals[2]).item(), "stopped": stopped,
            "images": int(totals[2].item())}


@torch.inference_mode()
def predict_logits(model: nn.Module, images_uint8: torch.Tensor, rt: ComputeSettings, batch_size: int) -> torch.Tensor:
    """fp32 logits for every image (uint8 N x 1 x 28 x 28), in large batches, without augmentation. With
    `rt.tta_flip`, the log of the probabilities averaged over the image and its mirror image: still logits
    (softmax gives those averaged probabilities back), so every metric applies."""
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


def evaluate(model: nn.Module, data: DeviceData, rt: ComputeSettings, batch_size: int) -> dict:
    """Loss (plain cross-entropy) and accuracy over `data`, sharded across ranks and all-reduced."""
    idx = torch.arange(len(data), device=rt.device)[rt.rank::rt.world_size]  # every image once
    logits = predict_logits(model, data.images[idx], rt, batch_size)
    labels = data.labels[idx]
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(1) == labels).sum().float()
    totals = system.all_reduce_sum(torch.stack([loss_sum, correct, torch.tensor(float(len(idx)), device=rt.device)]))
    return {"loss": (totals[0] / totals[2]).item(), "acc": (totals[1] / totals[2]).item()}
