#!/usr/bin/env python3
"""Fine-tune a pretrained Fashion-MNIST CNN: keep the best model by validation, log to TensorBoard.

    python finetune_gpu.py                                   # shipped base model, the defaults
    python finetune_gpu.py --preset deep                     # one of the four plans
    python finetune_gpu.py --resume result/last.pt --epochs 40
    torchrun --nproc_per_node=2 finetune_gpu.py ...          # several GPUs (DDP)

Exit codes: 0 done, 1 the run failed (the message says why), 2 bad usage, 130/143 interrupted.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from fashion_ft.cli import add_shared, json_object
from fashion_ft.config import (
    DEFAULT_WEIGHT_DECAY,
    FINETUNE_WARMUP_EPOCHS,
    METRICS,
    OPTIMIZERS,
    PERMISSIONS,
    PRESETS,
    RESUME_FIXED_FIELDS,
    SCHEDULERS,
    Config,
    check_conflicts,
    default_run_name,
    flag_of,
    resolve_defaults,
    resume_differences,
    validate,
)
from fashion_ft.errors import UsageError, UserError

DEFAULTS = Config()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add_group in (model_and_data_flags, optimisation_flags, selection_and_output_flags, hardware_flags):
        add_group(p, DEFAULTS)
    return p


def model_and_data_flags(p: argparse.ArgumentParser, d: Config) -> None:
    """What to start from and what to train on."""
    from fashion_ft.data import AUGMENT_PRESETS, DEFAULT_SPLIT, VALIDATION_SOURCES
    from fashion_ft.model import ARCHS

    g = p.add_argument_group("model")
    g.add_argument("--model-path", default=d.model_path, help="pretrained checkpoint to start from")
    add_shared(g, "--model-def", "--model-kwargs", "--normalize")
    g.add_argument("--from-scratch", action="store_true", help="start from random weights (--arch) instead")
    g.add_argument("--arch", choices=list(ARCHS), default=d.arch, help="architecture for --from-scratch")
    g.add_argument("--arch-kwargs", type=json_object, default=d.arch_kwargs, metavar="JSON",
                   help='with --from-scratch: a JSON object overriding the arch\'s defaults, e.g. \'{"blocks": 1}\'')
    g.add_argument("--max-params", type=int, default=d.max_params,
                   help="refuse a model with more parameters (a typo in --arch-kwargs, or widths recorded in a "
                        "damaged checkpoint), before any memory is taken")
    add_shared(g, "--trust-pickle")
    g = p.add_argument_group("data")
    add_shared(g, "--data-dir", "--download")
    g.add_argument("--val-size", type=int, default=d.val_size,
                   help=f"validation images held out of training; unset: the starting model's split, else {DEFAULT_SPLIT[1]}")
    g.add_argument("--split-seed", type=int, default=d.split_seed,
                   help=f"seed of the validation split; unset: the starting model's split, else {DEFAULT_SPLIT[0]}")
    g.add_argument("--val-from", choices=list(VALIDATION_SOURCES), default=d.val_from,
                   help="validate on images held out of the training files, or on one half of the test files "
                        "(testing on the other half); unset: the starting model's, else test-half for a model with "
                        "no record of its training split and no --val-size, else train")
    g.add_argument("--limit-train", type=int, default=d.limit_train, help="use only N training images (smoke runs)")
    g.add_argument("--augment", choices=list(AUGMENT_PRESETS), default=d.augment,
                   help="light: rotation ±10°; strong: + shifts, horizontal flips, random erasing")


def optimisation_flags(p: argparse.ArgumentParser, d: Config) -> None:
    """The plan, the optimizer, the schedule and the regularisation."""
    from fashion_ft.system import EVAL_BATCH_SIZE

    g = p.add_argument_group("optimisation")
    presets = "; ".join(f"{k}: " + ", ".join(f"{f}={v}" for f, v in vals.items()) for k, vals in PRESETS.items())
    g.add_argument("--preset", choices=list(PRESETS), default=d.preset,
                   help=f"a fine-tuning plan; flags given explicitly win ({presets})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help=f"batch for validation and test; unset: {EVAL_BATCH_SIZE['cpu']} on the CPU (fits the cache), "
                        f"{EVAL_BATCH_SIZE['gpu']} on a GPU")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="AdamW or SGD with Nesterov momentum")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (Nesterov)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"unset: {', '.join(f'{v:g} for {k}' for k, v in DEFAULT_WEIGHT_DECAY.items())}; never on "
                        "biases or BatchNorm")
    g.add_argument("--epochs", type=int, default=d.epochs, help="at most this many epochs (early stopping may end sooner)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler, help="LR schedule over the run")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help=f"linear LR warm-up; unset: {FINETUNE_WARMUP_EPOCHS:g} when fine-tuning, 0 with --from-scratch "
                        "or onecycle")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="cosine: the final LR")
    g.add_argument("--step-size", type=int, default=d.step_size, help="step: epochs between decays")
    g.add_argument("--step-gamma", type=float, default=d.step_gamma, help="step: decay factor")
    g.add_argument("--exp-gamma", type=float, default=d.exp_gamma, help="exponential: factor per epoch")
    g.add_argument("--plateau-factor", type=float, default=d.plateau_factor, help="plateau: decay factor")
    g.add_argument("--plateau-patience", type=int, default=d.plateau_patience, help="plateau: epochs to wait")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="of the training loss only")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="validate, select and save a moving average of the weights, updated with this decay "
                        "after every step (0.999 averages about the last 1,000 steps); 0: off")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip gradients to this norm")
    g.add_argument("--freeze-conv", action="store_true",
                   help="train only the head: the layers from the first fully connected one after the last "
                        "convolution (found from one forward pass); the features stay exactly as loaded")
    g.add_argument("--freeze-bn", action="store_true", help="freeze BatchNorm weights and running statistics")
    g.add_argument("--trainable", default=d.trainable, metavar="PATTERNS",
                   help="train only the layers whose names match these comma-separated patterns, e.g. 'fc*,bn_fc' "
                        "(where --freeze-conv cannot tell a model's head)")
    g = p.add_argument_group("distillation (a stronger model teaches this one)")
    g.add_argument("--teacher", nargs="+", default=d.teacher, metavar="PATH",
                   help="checkpoints of our architectures (e.g. model/resnet20.pt); several: their softmax averaged")
    g.add_argument("--kd-alpha", type=float, default=d.kd_alpha,
                   help="weight of the teachers' term in the loss (1 - it: the labels')")
    g.add_argument("--kd-temperature", type=float, default=d.kd_temperature,
                   help="softmax temperature of teachers and model in that term (higher: softer targets)")


def selection_and_output_flags(p: argparse.ArgumentParser, d: Config) -> None:
    """How the best model is chosen and where the results go."""
    g = p.add_argument_group("model selection and early stopping (validation split only)")
    g.add_argument("--select", choices=METRICS, default=d.select, help="validation metric that picks the best model")
    g.add_argument("--monitor", choices=METRICS, default=d.monitor,
                   help="validation metric for early stopping and the plateau scheduler")
    g.add_argument("--patience", type=int, default=d.patience, help="epochs without improvement before stopping")
    g.add_argument("--min-delta", type=float, default=d.min_delta, help="smallest change that counts")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="shuffling, augmentation, dropout and --from-scratch weights (not the split: --split-seed)")
    add_shared(g, "--tta")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=d.output, help="best model; last.pt and metrics.json go beside it")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--resume", default=d.resume, help="continue a run from its last.pt (path)")
    g.add_argument("--override-resume", action="store_true", help="allow changed hyperparameters on --resume")
    g.add_argument("--logdir", default=d.logdir, help="TensorBoard folder")
    g.add_argument("--run-name", default=d.run_name, help="TensorBoard run folder; unset: time, plan, optimizer, lr and batch size")


def hardware_flags(p: argparse.ArgumentParser, d: Config) -> None:
    """Where and how the numbers are computed, and what is printed."""
    from fashion_ft.system import AMP_MODES

    g = p.add_argument_group("hardware")
    add_shared(g, "--device")
    g.add_argument("--amp", choices=AMP_MODES, default=d.amp,
                   help="mixed precision; auto: bf16 on CPUs and GPUs that are fast at it (CUDA capability 8.0+), "
                        "fp16 with loss scaling on capability 7.x (V100, T4), else fp32; on Apple MPS fp32, with bf16 "
                        "or fp16 only when asked for")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last,
                   help="NHWC memory layout (faster convolutions)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels, no TF32, no cuDNN autotuning: repeatable on one GPU, a little slower")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (torchrun, CUDA)")
    g.add_argument("--scale-lr", action="store_true", help="multiply --lr by the world size (linear scaling)")
    g = p.add_argument_group("console")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    add_shared(g, "--debug")


def explicit_flags(argv) -> set[str]:
    """Config fields the user gave on the command line (they win over presets and resumed configs)."""
    marker = object()
    parser = get_args_parser()
    parser.set_defaults(**{f.name: marker for f in dataclasses.fields(Config)})
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not marker}


def load_resume(path: str, model_def: str | None) -> dict:
    """last.pt's contents, checked; a user's class is built from --model-def only (never from the record)."""
    from fashion_ft import userdef
    from fashion_ft.checkpoint import RESUME_HINT, load_checkpoint, validate_resumable
    from fashion_ft.outputs import resolve_path

    resolve_path(Path(path), "--resume")  # a symlink loop is worded as for every other path
    definition = userdef.parse(model_def) if model_def else None
    meta = load_checkpoint(path, refusal_hint=RESUME_HINT, model_def=definition).meta
    validate_resumable(path, meta)
    try:  # what it restores passes the checks argv does
        saved = {k: v for k, v in meta["config"].items() if k in dataclasses.asdict(DEFAULTS)}
        validate(resolve_defaults(Config(**{**saved, "resume": path})))
    except UsageError as exc:
        raise UserError(f"{path}: its saved config is not valid ({exc}); start a new run from its weights "
                        "with --model-path instead") from None
    return meta


def check_resume(saved: dict, cfg: Config, explicit: set) -> None:
    """Fixed fields may not change, whether a flag or a preset changes them; others need --override-resume."""
    fixed = sorted(flag_of(name) for name in RESUME_FIXED_FIELDS
                   if name in saved and saved[name] != getattr(cfg, name))
    if fixed:
        raise UsageError(f"--resume: {', '.join(fixed)} cannot change in a resumed run (a flag or --preset "
                         "changed it); start a new run from its best model instead (--model-path)")
    diffs = resume_differences(saved, cfg, explicit)
    if diffs and not cfg.override_resume:
        raise UsageError(f"--resume: these flags change the saved run: {', '.join(diffs)} "
                         "(pass --override-resume to accept)")


def free_output(output: str) -> str:
    """result/x.pt -> result/round2/x.pt (or round3, ...): the first folder holding no run's files."""
    path = Path(output)
    for n in range(2, 1000):
        folder = path.parent / f"round{n}"
        if not any((folder / name).exists() for name in (path.name, "last.pt", "metrics.json")):
            return str(folder / path.name)
    raise UsageError(f"--output: no free result/roundN folder beside {output}; pass --output")


def resolve_output(cfg: Config, explicit: set) -> str:
    """--output, except that a second round started from the default output (the multi-round workflow)
    writes to the next free round folder instead; an explicit --output may never be the input."""
    from fashion_ft.cli import printable
    from fashion_ft.outputs import resolve_path, same_file

    if cfg.from_scratch or cfg.resume or not same_file(resolve_path(Path(cfg.model_path), "--model-path"),
                                                        resolve_path(Path(cfg.output), "--output")):
        return cfg.output
    if "output" in explicit:
        raise UsageError(f"--output {cfg.output} is the --model-path input; choose another path, "
                         f"for example --output {free_output(cfg.output)}")
    output = free_output(cfg.output)
    if os.environ.get("RANK", "0") == "0":
        print(printable(f"output: {output} (the default output is the input model)"), flush=True)
    return output


def check_from_scratch_model(cfg: Config) -> None:
    """The --from-scratch model, built on the meta device (milliseconds, no memory): bad --arch-kwargs,
    another class count or an absurd size exit 2 before any work."""
    from functools import partial

    from fashion_ft.model import build_model, check_architecture, check_kwarg_types, resolve_arch_kwargs

    try:
        check_kwarg_types(cfg.arch, cfg.arch_kwargs or {})
        check_architecture(partial(build_model, cfg.arch, resolve_arch_kwargs(cfg.arch, cfg.arch_kwargs)),
                           cfg.max_params)
    except UserError as exc:
        raise UsageError(f"--arch-kwargs: {exc}") from None


def origins(explicit: set, preset: str | None):
    """origin(field): who set it, for messages: '--flag', '--flag (set by --preset P)', or 'default'."""
    def origin(name: str) -> str:
        flag = flag_of(name)
        if name in explicit:
            return flag
        if preset and name in PRESETS[preset]:
            return f"{flag} (set by --preset {preset})"
        return "default"

    return origin


def build_config(argv) -> tuple[Config, dict | None]:
    args = get_args_parser().parse_args(argv)
    explicit = explicit_flags(argv)
    values = dataclasses.asdict(DEFAULTS)
    resume_meta = None
    if args.resume:
        resume_meta = load_resume(args.resume, args.model_def)
        values.update({k: v for k, v in resume_meta["config"].items() if k in values and k not in PERMISSIONS})
        if "split_seed" not in resume_meta["config"]:  # written before the split had its own seed
            values["split_seed"] = resume_meta["config"].get("seed")
    preset = args.preset if args.preset and (not args.resume or "preset" in explicit) else None
    if preset:
        values.update(PRESETS[preset])
    values.update({k: getattr(args, k) for k in explicit})
    cfg = resolve_defaults(Config(**values))
    if resume_meta is not None:
        check_resume(resume_meta["config"], cfg, explicit)
    validate(cfg)
    if not cfg.resume:
        check_conflicts(cfg, origins(explicit, preset))
    if cfg.from_scratch and not cfg.resume:
        check_from_scratch_model(cfg)
    run_name = cfg.run_name or (resume_meta or {}).get("run_name") or default_run_name(cfg)
    return dataclasses.replace(cfg, output=resolve_output(cfg, explicit), run_name=run_name), resume_meta


def main(argv=None) -> int:
    from fashion_ft import cli
    from fashion_ft.signals import SignalGuard

    def body() -> int:
        cfg, resume_meta = build_config(argv)
        from fashion_ft.trainer import fine_tune  # imported late: a usage error is reported fast

        fine_tune(cfg, resume_meta, signals)
        return 0

    with SignalGuard() as signals:  # from the first line: a signal during set-up counts as one in training
        return cli.run(body, debug="--debug" in (sys.argv[1:] if argv is None else argv), signals=signals)


if __name__ == "__main__":
    sys.exit(main())
