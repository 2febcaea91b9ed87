"""The optimizer, its LR schedules, its restore from a last.pt, and the trackers of the best epoch."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import Config
from .errors import UserError


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
