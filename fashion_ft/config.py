"""The one configuration object of a fine-tuning run, its presets, its validation and resume rules, the
shared flags, and the command-line contract (one line on stderr, an exit code).

Defaults are written here once; the scripts' flags take theirs from them (add_flag).
"""

import argparse
import dataclasses
import datetime
import json
import math
import numbers
import os
import sys
import typing
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from .errors import Interrupted, SignalGuard, UsageError, UserError, first_line, printable

FLOAT32_MAX = 3.4028234e38  # torch keeps hyperparameters such as the LR in float32 tensors
MAX_PARAMETERS = 100_000_000  # a 400 MB best model and a 1.6 GB last.pt: surely a typo in the widths
SEED_LIMIT = 2**32  # torch generators take 64 bits; the per-epoch seeds are derived by multiplication
METRICS = ("val_acc", "val_loss")
# The best validation accuracy of 0, 0.5 and 1 epoch on the light plan (bench/results/README.md, "Warm-up").
FINETUNE_WARMUP_EPOCHS = 0.5
SCHEDULERS = ("cosine", "step", "plateau", "onecycle", "exponential", "none")
OPTIMIZERS = ("adamw", "sgd")
TTA_MODES = ("none", "flip")
DEFAULT_WEIGHT_DECAY = {"adamw": 0.01, "sgd": 5e-4}


# Each field is one flag of the scripts, with its help (`{...}`: filled in by add_flag from _fills()) and what
# --resume does with it:
#   setting     taken from last.pt; a flag that changes it needs --override-resume
#   free        taken from last.pt; a flag may change it: where and how long the same experiment runs
#   fixed       taken from last.pt; never changes, whatever changes it: it defines the model, the data or the
#               optimizer state
#   permission  never taken from last.pt: one run's --overwrite may not replace another run's files, nor its
#               record choose code to run
def _rule(rule: str):
    def field(default, help: str, **flag):  # flag: add_argument's own keywords (metavar, nargs, ...)
        return dataclasses.field(default=default, metadata={"resume": rule, "help": help, "flag": flag})
    return field


setting, free, fixed, permission = (_rule(r) for r in ("override", "free", "fixed", "permission"))
UNSET_SPLIT = "unset: the starting model's split, else"


@dataclass
class Config:
    # model
    model_path: str = free("model/mnist_cnn3.pt", "pretrained checkpoint to start from")
    model_def: str | None = permission(
        None, "your own network class (a file path, hyphens allowed, or pkg.mod:CLASS), for a checkpoint of its "
        "weights; the file is imported without running its __main__ block", metavar="FILE.py:CLASS")
    model_kwargs: dict | None = fixed(None, "keyword arguments of its constructor, e.g. '{{\"width\": 32}}'",
                                      metavar="JSON")
    normalize: list | None = fixed(
        None, "the input normalisation the model was trained with (pixels in [0, 1]); unset: the checkpoint's "
        "record, else Fashion-MNIST's {fashion[0]:.4f} {fashion[1]:.4f} (MNIST's is {mnist[0]} {mnist[1]})",
        type=float, nargs=2, metavar=("MEAN", "STD"))
    from_scratch: bool = fixed(False, "start from random weights (--arch) instead")
    arch: str = fixed("cnn3", "architecture for --from-scratch")
    arch_kwargs: dict | None = fixed(None, "with --from-scratch: a JSON object overriding the arch's defaults, e.g. "
                                     "'{{\"blocks\": 1}}'", metavar="JSON")
    max_params: int = free(MAX_PARAMETERS, "refuse a model with more parameters (a typo in --arch-kwargs, or widths "
                           "recorded in a damaged checkpoint), before any memory is taken")
    trust_pickle: bool = permission(False, "allow a checkpoint holding pickled Python objects (runs code from the "
                                    "file!)")
    # data
    data_dir: str | None = free(None, "folder with the IDX files; unset: $FASHION_MNIST_DIR, ./data, then the "
                                "Debian folder")
    download: bool = permission(False, "download Fashion-MNIST into ./data if missing")
    val_size: int | None = fixed(None, f"validation images held out of training; {UNSET_SPLIT} {{split[1]}}")
    split_seed: int | None = fixed(None, f"seed of the validation split; {UNSET_SPLIT} {{split[0]}}")
    val_from: str | None = fixed(
        None, "validate on images held out of the training files, or on one half of the test files (testing on the "
        "other half); unset: the starting model's, else test-half for a model with no record of its training "
        "split and no --val-size, else train")
    limit_train: int | None = setting(None, "use only N training images (smoke runs)")
    augment: str = setting("light", "light: rotation ±10°; strong: + shifts, horizontal flips, random erasing")
    # optimisation
    preset: str | None = setting(None, "a fine-tuning plan; flags given explicitly win ({presets})")
    batch_size: int = setting(256, "per process")
    eval_batch_size: int | None = free(None, "batch for validation and test; unset: {eval_batch[cpu]} on the CPU "
                                       "(fits the cache), {eval_batch[gpu]} on a GPU")
    lr: float = setting(0.001, "peak learning rate")
    optimizer: str = fixed("adamw", "AdamW or SGD with Nesterov momentum")
    momentum: float = setting(0.9, "SGD momentum (Nesterov)")
    weight_decay: float | None = setting(None, "unset: {weight_decay}; never on biases or BatchNorm")
    epochs: int = free(30, "at most this many epochs (early stopping may end sooner)")
    scheduler: str = setting("cosine", "LR schedule over the run")
    warmup_epochs: float | None = setting(None, "linear LR warm-up; unset: {warmup:g} when fine-tuning, 0 with "
                                          "--from-scratch or onecycle")
    min_lr: float = setting(1e-6, "cosine: the final LR")
    step_size: int = setting(10, "step: epochs between decays")
    step_gamma: float = setting(0.1, "step: decay factor")
    exp_gamma: float = setting(0.9, "exponential: factor per epoch")
    plateau_factor: float = setting(0.5, "plateau: decay factor")
    plateau_patience: int = setting(3, "plateau: epochs to wait")
    label_smoothing: float = setting(0.0, "of the training loss only")
    ema_decay: float = setting(0.0, "validate, select and save a moving average of the weights, updated with this "
                               "decay after every step (0.999 averages about the last 1,000 steps); 0: off")
    max_grad_norm: float | None = setting(None, "clip gradients to this norm")
    freeze_conv: bool = fixed(False, "train only the head: the layers from the first fully connected one after the "
                              "last convolution (found from one forward pass); the features stay exactly as loaded")
    freeze_bn: bool = fixed(False, "freeze BatchNorm weights and running statistics")
    trainable: str | None = fixed(None, "train only the layers whose names match these comma-separated patterns, "
                                  "e.g. 'fc*,bn_fc' (where --freeze-conv cannot tell a model's head)",
                                  metavar="PATTERNS")
    # distillation: the loss is (1 - kd_alpha) * CE(labels) + kd_alpha * T^2 * KL(teachers' softmax at T || the model's)
    # alpha and T: the best validation accuracy of the screen (bench/results/distill/): accuracy fell as T rose
    # (the shipped teacher's targets near uniform at T 4) and alpha 0.9 trailed 0.5 at every T
    teacher: list | None = setting(None, "checkpoints of our architectures (e.g. model/resnet20.pt); several: their "
                                   "softmax averaged", type=str, nargs="+", metavar="PATH")
    kd_alpha: float = setting(0.5, "weight of the teachers' term in the loss (1 - it: the labels')")
    kd_temperature: float = setting(1.0, "softmax temperature of teachers and model in that term (higher: softer "
                                    "targets)")
    # model selection and early stopping
    select: str = setting("val_acc", "validation metric that picks the best model")
    monitor: str = setting("val_loss", "validation metric for early stopping and the plateau scheduler")
    patience: int = setting(15, "epochs without improvement before stopping")
    min_delta: float = setting(0.0, "smallest change that counts")
    seed: int = setting(42, "shuffling, augmentation, dropout and --from-scratch weights (not the split: "
                        "--split-seed)")
    tta: str = setting("none", "flip: predictions average each image and its mirror image (pays off after --augment "
                       "strong, which trains on mirror images)")
    # output
    output: str = free("result/mnist_cnn_finetuned.pt", "best model; last.pt and metrics.json go beside it")
    overwrite: bool = permission(False, "replace existing output files")
    resume: str | None = free(None, "continue a run from its last.pt (path)")
    override_resume: bool = permission(False, "allow changed hyperparameters on --resume")
    logdir: str = free("logs_finetune", "TensorBoard folder")
    run_name: str | None = free(None, "TensorBoard run folder; unset: time, plan, optimizer, lr and batch size")
    # hardware
    device: str = free("auto", "auto (CUDA, else Apple MPS, else CPU) | cpu | cuda | cuda:N | mps")
    amp: str = setting("auto", "mixed precision; auto: bf16 on CPUs and GPUs that are fast at it (CUDA capability "
                       "8.0+), fp16 with loss scaling on capability 7.x (V100, T4), else fp32; on Apple MPS fp32, "
                       "with bf16 or fp16 only when asked for")
    channels_last: bool = setting(True, "NHWC memory layout (faster convolutions)",
                                  action=argparse.BooleanOptionalAction)
    compile: bool = free(False, "torch.compile the model")
    deterministic: bool = free(False, "deterministic kernels, no TF32, no cuDNN autotuning: repeatable on one GPU, a "
                               "little slower")
    sync_bn: bool = setting(False, "SyncBatchNorm across GPUs (torchrun, CUDA)")
    scale_lr: bool = setting(False, "multiply --lr by the world size (linear scaling)")
    # console
    quiet: bool = free(False, "no progress bars or per-epoch lines")
    debug: bool = free(False, "show tracebacks")

    @property
    def trainable_patterns(self) -> list[str] | None:
        return [p.strip() for p in self.trainable.split(",") if p.strip()] if self.trainable else None

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return DEFAULT_WEIGHT_DECAY[self.optimizer]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# finetune_gpu.py --help's sections: each begins at its first field, in Config's order
SECTIONS = {"model_path": "model", "data_dir": "data", "preset": "optimisation",
            "teacher": "distillation (a stronger model teaches this one)",
            "select": "model selection and early stopping (validation split only)", "output": "output",
            "device": "hardware", "quiet": "console"}

# The plans of the guide. A flag given explicitly wins over its preset's value.
PRESETS = {
    "light": {"lr": 0.001, "batch_size": 256, "epochs": 30, "scheduler": "cosine"},
    "head": {"lr": 0.001, "batch_size": 256, "epochs": 50, "freeze_conv": True},
    # the long plan regularises harder: 30 epochs on rotation alone already reach 97% train accuracy
    # (bench/results/before-warmup/logs/light.log); and waits longer: its validation loss rested from
    # epoch 21 to 36, then fell until epoch 72 (before-warmup/logs/deep.log); a patience of 15 stops it at 36.
    # It stops on validation accuracy: label smoothing makes a model less confident, so its validation loss
    # stays above the unsmoothed starting model's (epoch 0) at a higher accuracy, and a loss-based stop ends
    # the run at epoch 30 (bench/results/logs/deep_monitor_val_loss.log)
    "deep": {"lr": 0.002, "batch_size": 512, "epochs": 100, "augment": "strong", "label_smoothing": 0.1,
             "patience": 30, "monitor": "val_acc"},
    "conservative": {"lr": 0.0005, "batch_size": 256},
    # The light plan taught by the shipped ResNet-20 at the screen's best alpha and T (bench/results/distill/).
    # It waits the whole cosine: a converged model falls at the peak LR and gains, if at all, as the LR decays.
    "distill": {"lr": 0.001, "batch_size": 256, "epochs": 30, "scheduler": "cosine", "patience": 30,
                "teacher": ["model/resnet20.pt"], "kd_alpha": 0.5, "kd_temperature": 1.0},
    # The guide's last step, a deeper network trained from random weights (bench/results/resnet-candidates/):
    # the candidates' 4-epoch recipe run for as many epochs as fit in 90 minutes on 2 CPU threads. OneCycle
    # sets the LR from start to end, so early stopping waits the whole run; selection still keeps the best.
    "resnet20": {"arch": "resnet", "from_scratch": True, "optimizer": "sgd", "lr": 0.2, "weight_decay": 0.0005,
                 "batch_size": 256, "scheduler": "onecycle", "augment": "strong", "label_smoothing": 0.1,
                 "epochs": 70, "patience": 70, "monitor": "val_acc"},
    # Fine-tuning the shipped ResNet-20 on its own recipe with a short cosine restart at a twentieth of its
    # peak LR; its starting model is epoch 0, so it keeps the base model when no epoch beats it.
    "resnet20-tune": {"model_path": "model/resnet20.pt", "optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0005,
                      "augment": "strong", "label_smoothing": 0.1, "epochs": 15, "monitor": "val_acc"},
}

RESUME_RULES = {f.name: f.metadata.get("resume", "override") for f in dataclasses.fields(Config)}
PERMISSIONS = {name for name, rule in RESUME_RULES.items() if rule == "permission"}


def restored(saved: dict) -> Config:
    """The Config a resumed run starts from: last.pt's, without its permissions or keys that name no field."""
    values = {k: v for k, v in saved.items() if RESUME_RULES.get(k, "permission") != "permission"}
    values["split_seed"] = saved.get("split_seed", saved.get("seed"))  # older records: --seed made the split
    return resolve_defaults(Config(**values))


def check_resume(saved: Config, cfg: Config) -> None:
    """The resumed run against the one saved: a fixed field never changes, an unmarked one only with
    --override-resume (whether a flag or --preset changes it)."""
    changed = [name for name, rule in RESUME_RULES.items() if getattr(saved, name) != getattr(cfg, name)]
    fixed = [flag_of(name) for name in changed if RESUME_RULES[name] == "fixed"]
    if fixed:
        raise UsageError(f"--resume: {', '.join(fixed)} cannot change in a resumed run; start a new run from "
                         "its best model instead (--model-path)")
    diffs = [f"{flag_of(n)} {getattr(saved, n)} -> {getattr(cfg, n)}" for n in changed if RESUME_RULES[n] == "override"]
    if diffs and not cfg.override_resume:
        raise UsageError(f"--resume: these flags change the saved run: {', '.join(diffs)} "
                         "(pass --override-resume to accept)")


def default_run_name(cfg: Config) -> str:
    """The TensorBoard run folder's name when --run-name is not given: time, plan, optimizer, LR, batch."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    plan = cfg.preset or ("scratch" if cfg.from_scratch else "finetune")
    return f"{stamp}_{plan}_{cfg.optimizer}_lr{cfg.lr:g}_bs{cfg.batch_size}"


def resolve_defaults(cfg: Config) -> Config:
    """Defaults that depend on the run: the warm-up only for fine-tuning (random weights have nothing to
    lose, and onecycle warms up by itself), and never as long as the run."""
    if cfg.warmup_epochs is not None:
        return cfg
    warm = cfg.from_scratch or cfg.scheduler == "onecycle" or cfg.epochs <= FINETUNE_WARMUP_EPOCHS
    return dataclasses.replace(cfg, warmup_epochs=0.0 if warm else FINETUNE_WARMUP_EPOCHS)


def _require(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise UsageError(f"{flag}: {message}")


POSITIVE, AT_LEAST_1, NOT_NEGATIVE = (lambda v: v > 0, "> 0"), (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0")
SHARE, FACTOR = (lambda v: 0 <= v < 1, "in [0, 1)"), (lambda v: 0 < v <= 1, "in (0, 1]")
SEED = (lambda v: 0 <= v < SEED_LIMIT, "in [0, 2**32)")
# field -> (test, what it must be): checked whenever the field is set (None leaves the default to apply)
LIMITS = {
    "lr": POSITIVE, "batch_size": AT_LEAST_1, "eval_batch_size": AT_LEAST_1, "epochs": AT_LEAST_1,
    "patience": NOT_NEGATIVE, "min_delta": NOT_NEGATIVE, "warmup_epochs": NOT_NEGATIVE,
    "val_size": (lambda v: v >= 10, ">= 10 (model selection needs a validation set)"),
    "seed": SEED, "split_seed": SEED, "label_smoothing": SHARE, "weight_decay": NOT_NEGATIVE, "momentum": SHARE,
    "ema_decay": (SHARE[0], "in [0, 1) (0 turns it off)"), "max_grad_norm": POSITIVE, "max_params": AT_LEAST_1,
    "teacher": (lambda v: bool(v) and all(isinstance(p, str) and p for p in v), "one or more checkpoint paths"),
    "kd_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"), "kd_temperature": POSITIVE,
}
# A scheduler's own settings are checked only when it is chosen: a default that it ignores never fails.
SCHEDULE_LIMITS = {
    "step": {"step_size": AT_LEAST_1, "step_gamma": FACTOR},
    "exponential": {"exp_gamma": FACTOR},
    "plateau": {"plateau_factor": (lambda v: 0 < v < 1, "in (0, 1)"), "plateau_patience": NOT_NEGATIVE},
    "cosine": {"min_lr": (NOT_NEGATIVE[0], "in [0, --lr)")},
}


def choices() -> dict[str, tuple]:
    """The fields whose value is one of a list (imported late: data, model and system import torch)."""
    from .data import AUGMENT_PRESETS, VALIDATION_SOURCES
    from .model import ARCHS
    from .system import AMP_MODES

    return {"select": METRICS, "monitor": METRICS, "scheduler": SCHEDULERS, "optimizer": OPTIMIZERS,
            "augment": tuple(AUGMENT_PRESETS), "tta": TTA_MODES, "amp": AMP_MODES, "arch": tuple(ARCHS),
            "preset": (None, *PRESETS), "val_from": (None, *VALIDATION_SOURCES)}


def _check_types(cfg: Config) -> None:
    """Each field holds its declared type, whatever set it (argv parses to them; a last.pt may not), and
    every float is one torch can hold: inf, nan and 1e39 parse as floats, and no flag of ours means
    anything with them."""
    for name, hint in typing.get_type_hints(Config).items():
        value, allowed = getattr(cfg, name), typing.get_args(hint) or (hint,)
        allowed = tuple(t for t in allowed if isinstance(t, type)) + ((int,) if float in allowed else ())
        _require(isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool)), flag_of(name),
                 f"must be {' or '.join(t.__name__ for t in allowed if t is not type(None))}, got {value!r}")
        if isinstance(value, float):
            _require(math.isfinite(value) and abs(value) <= FLOAT32_MAX, flag_of(name),
                     f"must be a finite number (at most {FLOAT32_MAX:.1e}), got {value}")
    for name, values in choices().items():
        _require(getattr(cfg, name) in values, flag_of(name), f"must be one of {', '.join(map(str, values))}, "
                 f"got {getattr(cfg, name)!r}")


def flag_of(name: str) -> str:
    """The command-line flag of a Config field."""
    return f"--{name.replace('_', '-')}"


def validate(cfg: Config) -> None:
    """Every bad value found before any work, whatever set it: a UsageError (exit 2) naming the flag."""
    _check_types(cfg)
    for name, (ok, what) in {**LIMITS, **SCHEDULE_LIMITS.get(cfg.scheduler, {})}.items():
        value = getattr(cfg, name)
        _require(value is None or ok(value), flag_of(name), f"must be {what}, got {value}")
    _require(cfg.scheduler != "cosine" or cfg.min_lr < cfg.lr, "--min-lr", f"must be in [0, --lr), got {cfg.min_lr}")
    _require(not (cfg.scheduler == "onecycle" and cfg.warmup_epochs), "--warmup-epochs",
             "onecycle has its own warm-up; drop --warmup-epochs")
    _require(cfg.warmup_epochs < cfg.epochs, "--warmup-epochs", "must be shorter than --epochs")
    _require(cfg.limit_train is None or cfg.limit_train >= cfg.batch_size, "--limit-train",
             f"must be >= --batch-size ({cfg.batch_size}), got {cfg.limit_train}")
    # an empty value would otherwise mean the flag was not given (--trainable: train every layer), or for
    # --logdir the current folder
    _require(cfg.model_def != "", "--model-def", "expected FILE.py:CLASS or package.module:CLASS, got ''")
    _require(cfg.logdir != "", "--logdir", "expected a folder, got ''")
    _require(cfg.trainable is None or bool(cfg.trainable_patterns), "--trainable",
             f"expected comma-separated layer-name patterns such as 'fc*,bn_fc', got {cfg.trainable!r}")
    check_normalize(cfg.normalize)


# Wide enough for any normalisation of pixels in [0, 1] (0-255 pixels unnormalised: STD 1/255), narrow
# enough that (x - MEAN) / STD stays within 11,000 in size, where fp16 (65,504) and float32 hold it
NORMALIZE_MIN_STD, NORMALIZE_MAX_MEAN = 1e-3, 10.0
NORMALIZE_RULE = f"finite numbers MEAN STD with |MEAN| <= {NORMALIZE_MAX_MEAN:g} and STD >= {NORMALIZE_MIN_STD:g}"


def normalize_ok(mean, std) -> bool:
    """Whether a normalisation keeps NORMALIZE_RULE: --normalize's, and a checkpoint's record of it."""
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (mean, std)):
        return False
    return abs(mean) <= NORMALIZE_MAX_MEAN and NORMALIZE_MIN_STD <= std < math.inf


def check_normalize(values: list | None) -> None:
    """--normalize MEAN STD (both scripts)."""
    if values is not None:
        _require(len(values) == 2 and normalize_ok(*values), "--normalize", f"must be {NORMALIZE_RULE}, got {values}")


def check_conflicts(cfg: Config, given, preset: str | None) -> None:
    """Settings that contradict each other, named by where each came from (the flag, or the preset that
    set it), so that an explicit flag never silently loses to a preset."""
    def origin(name: str) -> str:
        if name in given:
            return flag_of(name)
        return f"{flag_of(name)} (set by --preset {preset})" if name in PRESETS.get(preset, {}) else "default"

    def refuse(a: str, b: str, why: str) -> None:
        raise UsageError(f"{origin(a)} and {origin(b)} cannot be combined: {why}")

    for name in ("kd_alpha", "kd_temperature"):
        if not cfg.teacher and origin(name) != "default":
            raise UsageError(f"{origin(name)}: only with --teacher (it weighs the teachers' predictions)")

    if not cfg.from_scratch:
        for name in ("arch", "arch_kwargs"):
            if origin(name) != "default":
                raise UsageError(f"{origin(name)}: only with --from-scratch (a checkpoint brings its own "
                                 "architecture)")
        return
    if cfg.freeze_conv:
        refuse("freeze_conv", "from_scratch", "frozen random filters learn nothing")
    if cfg.model_def:
        refuse("model_def", "from_scratch", "--from-scratch builds one of our networks (--arch)")
    if origin("model_path") != "default":
        refuse("model_path", "from_scratch", "random weights start from no checkpoint")


# ---------------------------------------------------------------- the command line: one line on stderr, an exit code

# requirements.txt: a script that cannot import one of these runs in a Python the project was not set up in
REQUIRED_PACKAGES = ("torch", "torchvision", "tensorboard", "numpy", "tqdm")


def json_object(text: str) -> dict:
    """argparse type of a JSON-object flag (--arch-kwargs, --model-kwargs), or a one-line usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"blocks\": 1}}', got {text}")
    return value


def _fills() -> dict:
    """What the flags' help texts name (imported late: data and system import torch)."""
    from .data import CANDIDATES, DEFAULT_SPLIT
    from .system import EVAL_BATCH_SIZE

    presets = "; ".join(f"{k}: " + ", ".join(f"{f}={v}" for f, v in vals.items()) for k, vals in PRESETS.items())
    return {"split": DEFAULT_SPLIT, "eval_batch": EVAL_BATCH_SIZE, "warmup": FINETUNE_WARMUP_EPOCHS, "presets": presets,
            "weight_decay": ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_WEIGHT_DECAY.items()),
            "fashion": CANDIDATES["Fashion-MNIST's"], "mnist": CANDIDATES["MNIST's"]}


def add_flag(g, name: str, **kw) -> None:
    """Add the flag of Config field `name` to a parser or argument group: its help, default (which --help
    shows), type and choices are the field's; `kw` overrides add_argument's keywords."""
    field = next(f for f in dataclasses.fields(Config) if f.name == name)
    kinds = [t for t in typing.get_args(field.type) or (field.type,) if t is not type(None)]
    kw = {**field.metadata["flag"], **kw}
    if bool in kinds:
        kw.setdefault("action", "store_true")
    elif "type" not in kw:
        kw["type"] = json_object if dict in kinds else kinds[0]
    if name in (options := choices()):
        kw["choices"] = [c for c in options[name] if c is not None]
    g.add_argument(flag_of(name), default=field.default, help=field.metadata["help"].format(**_fills()), **kw)


def add_shared(g, *flags: str) -> None:
    """Add these flags (--model-def, ...), as finetune_gpu.py defines them, to another script's parser."""
    for flag in flags:
        add_flag(g, flag[2:].replace("-", "_"))


def error_prefix() -> str:
    """Under torchrun every rank reports its own failure, so say which one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"error (rank {os.environ.get('RANK', '?')} of {world}): " if world > 1 else "error: "


def silence(stream=None) -> None:
    """Point a stream whose reader went away at devnull, as Python's documentation on SIGPIPE advises,
    so that the interpreter's own flush at exit does not fail a second time with a traceback."""
    with suppress(OSError, ValueError):  # no file behind it (captured, closed): nothing to point
        os.dup2(os.open(os.devnull, os.O_WRONLY), (stream or sys.stdout).fileno())


def run(body: Callable[[], int], debug: bool, prefix: Callable[[], str] = error_prefix,
        signals: SignalGuard | None = None) -> int:
    """body() -> its exit code; every way it can fail -> one line on stderr and the matching code."""
    warnings.formatwarning = lambda message, *_, **__: printable(f"warning: {message}") + "\n"
    try:
        try:
            code = body()
            if signals is not None and signals.received:
                raise signals.interrupted()
        except BaseException as exc:
            if signals is not None and signals.received and not isinstance(exc, Interrupted):
                raise signals.interrupted() from None
            raise
        finally:
            if sys.stdout is not None and not sys.stdout.closed:
                sys.stdout.flush()  # a vanished reader shows up here, while it can still be handled
        return code
    except BrokenPipeError:  # the reader went away (`script | head -1`): nothing to tell it
        silence()
        return 1
    except UserError as exc:
        if debug:
            raise
        print(printable(f"{prefix()}{exc}"), file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        with suppress(OSError):  # after a hang-up the terminal is gone: the exit code still tells
            print(printable(f"interrupted ({exc})" + (f": {exc.hint}" if exc.hint else "")), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence keeps the one-line contract
        return _unexpected(exc, debug, prefix)


def _unexpected(exc: Exception, debug: bool, prefix: Callable[[], str]) -> int:
    """An error nobody worded: its type and first line, or the advice for a known cause."""
    if debug:
        raise exc
    hint = missing_package_hint(exc)
    if hint is None and "torch" in sys.modules:  # no torch, no MPS error; and .system imports torch
        from .system import mps_hint

        hint = mps_hint(exc)
    print(printable(prefix() + (hint or f"{type(exc).__name__}: {first_line(exc)} (rerun with --debug for the "
                                        "traceback)")), file=sys.stderr)
    return 1


def missing_package_hint(exc: BaseException) -> str | None:
    """The set-up advice for a package of requirements.txt that this Python lacks; None for any other error."""
    package = (getattr(exc, "name", None) or "").partition(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or package not in REQUIRED_PACKAGES:
        return None
    script = os.path.basename(sys.argv[0]) if sys.argv[0].endswith(".py") else "SCRIPT.py"
    return (f"{package} is not installed in {sys.executable}, the Python running this script: set the project "
            f"up with `bash scripts/setup.sh`, then `source .venv/bin/activate` (or run `.venv/bin/python "
            f"{script} ...`)")
