#!/usr/bin/env python3
"""Fine-tune a pretrained Fashion-MNIST CNN: keep the best model by validation, log to TensorBoard.

    python finetune_gpu.py                                   # shipped base model, the defaults
    python finetune_gpu.py --preset deep                     # one of the plans
    python finetune_gpu.py --resume result/last.pt --epochs 40
    torchrun --nproc_per_node=2 finetune_gpu.py ...          # several GPUs (DDP)

Exit codes: 0 done, 1 the run failed (the message says why), 2 bad usage, 129/130/143 interrupted.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from fashion_ft.config import (
    DEFAULT_WEIGHT_DECAY,
    FINETUNE_WARMUP_EPOCHS,
    PRESETS,
    Config,
    add_flag,
    add_shared,
    check_conflicts,
    check_resume,
    default_run_name,
    resolve_defaults,
    restored,
    validate,
)
from fashion_ft.errors import UsageError, UserError

DEFAULTS = Config()
# What the namespace holds for a flag not given: argparse writes a default only where the namespace has no value
UNSET = object()


def main(argv=None) -> int:
    from fashion_ft import config
    from fashion_ft.errors import SignalGuard

    def body() -> int:
        cfg, resume_meta = build_config(argv)
        from fashion_ft.trainer import fine_tune  # imported late: a usage error is reported fast

        fine_tune(cfg, resume_meta, signals)
        return 0

    with SignalGuard() as signals:  # from the first line: a signal during set-up counts as one in training
        return config.run(body, debug="--debug" in (sys.argv[1:] if argv is None else argv), signals=signals)


def build_config(argv) -> tuple[Config, dict | None]:
    """argv, parsed once, as the run's Config: the defaults (on --resume, last.pt's config), then the
    preset's values, then the flags given, which win; checked before any work. Also last.pt's contents."""
    unset = argparse.Namespace(**{f.name: UNSET for f in dataclasses.fields(Config)})
    given = {k: v for k, v in vars(get_args_parser().parse_args(argv, unset)).items() if v is not UNSET}
    resume_meta, start = None, DEFAULTS
    if given.get("resume"):
        resume_meta, start = load_resume(given["resume"], given.get("model_def"))
    preset = given.get("preset")  # a resumed run's own preset is in its config already
    cfg = resolve_defaults(Config(**{**dataclasses.asdict(start), **PRESETS.get(preset, {}), **given}))
    validate(cfg)
    if resume_meta:
        check_resume(start, cfg)
    else:
        check_conflicts(cfg, given, preset)
        if cfg.from_scratch:
            check_from_scratch_model(cfg)
    run_name = cfg.run_name or default_run_name(cfg)
    return dataclasses.replace(cfg, output=resolve_output(cfg, given), run_name=run_name), resume_meta


def load_resume(path: str, model_def: str | None) -> tuple[dict, Config]:
    """last.pt's contents, checked, and the Config it saved; a user's class is built from --model-def only
    (never from the record)."""
    from fashion_ft import model
    from fashion_ft.checkpoint import RESUME_HINT, load_checkpoint, validate_resumable
    from fashion_ft.errors import resolve_path

    resolve_path(Path(path), "--resume")  # a symlink loop is worded as for every other path
    definition = model.parse(model_def) if model_def else None
    meta = load_checkpoint(path, refusal_hint=RESUME_HINT, model_def=definition).meta
    validate_resumable(path, meta)
    try:  # what it restores passes the checks argv does
        saved = restored(meta["config"])
        validate(saved)
    except UsageError as exc:
        raise UserError(f"{path}: its saved config is not valid ({exc}); start a new run from its weights "
                        "with --model-path instead") from None
    return meta, saved


def check_from_scratch_model(cfg: Config) -> None:
    """The --from-scratch model, built on the meta device (milliseconds, no memory): bad --arch-kwargs,
    another class count or an absurd size exit 2 before any work."""
    from functools import partial

    from fashion_ft.model import build_model, check_architecture

    try:  # build_model checks the kwargs themselves
        check_architecture(partial(build_model, cfg.arch, cfg.arch_kwargs), cfg.max_params)
    except UserError as exc:
        raise UsageError(f"--arch-kwargs: {exc}") from None


def resolve_output(cfg: Config, given: dict) -> str:
    """--output, except that a second round started from the default output (the multi-round workflow)
    writes to the next free round folder instead; an explicit --output may never be the input."""
    from fashion_ft.config import printable
    from fashion_ft.errors import resolve_path
    from fashion_ft.outputs import same_file

    if cfg.from_scratch or cfg.resume or not same_file(resolve_path(Path(cfg.model_path), "--model-path"),
                                                        resolve_path(Path(cfg.output), "--output")):
        return cfg.output
    if "output" in given:
        raise UsageError(f"--output {cfg.output} is the --model-path input; choose another path, "
                         f"for example --output {free_output(cfg.output)}")
    output = free_output(cfg.output)
    if os.environ.get("RANK", "0") == "0":
        print(printable(f"output: {output} (the default output is the input model)"), flush=True)
    return output


def free_output(output: str) -> str:
    """result/x.pt -> result/round2/x.pt (or round3, ...): the first folder holding no run's files."""
    path = Path(output)
    for n in range(2, 1000):
        folder = path.parent / f"round{n}"
        if not any((folder / name).exists() for name in (path.name, "last.pt", "metrics.json")):
            return str(folder / path.name)
    raise UsageError(f"--output: no free result/roundN folder beside {output}; pass --output")


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag, one per Config field; its default, type and choices are the field's."""
    from fashion_ft.data import DEFAULT_SPLIT
    from fashion_ft.system import EVAL_BATCH_SIZE

    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    add_flag(g, "model_path", "pretrained checkpoint to start from")
    add_shared(g, "--model-def", "--model-kwargs", "--normalize")
    add_flag(g, "from_scratch", "start from random weights (--arch) instead")
    add_flag(g, "arch", "architecture for --from-scratch")
    add_flag(g, "arch_kwargs", "with --from-scratch: a JSON object overriding the arch's defaults, e.g. "
                               '\'{"blocks": 1}\'', metavar="JSON")
    add_flag(g, "max_params", "refuse a model with more parameters (a typo in --arch-kwargs, or widths recorded in a "
                              "damaged checkpoint), before any memory is taken")
    add_shared(g, "--trust-pickle")
    g = p.add_argument_group("data")
    add_shared(g, "--data-dir", "--download")
    add_flag(g, "val_size", "validation images held out of training; unset: the starting model's split, else "
                            f"{DEFAULT_SPLIT[1]}")
    add_flag(g, "split_seed", "seed of the validation split; unset: the starting model's split, else "
                              f"{DEFAULT_SPLIT[0]}")
    add_flag(g, "val_from", "validate on images held out of the training files, or on one half of the test "
                            "files (testing on the other half); unset: the starting model's, else test-half for a "
                            "model with no record of its training split and no --val-size, else train")
    add_flag(g, "limit_train", "use only N training images (smoke runs)")
    add_flag(g, "augment", "light: rotation ±10°; strong: + shifts, horizontal flips, random erasing")

    g = p.add_argument_group("optimisation")
    presets = "; ".join(f"{k}: " + ", ".join(f"{f}={v}" for f, v in vals.items()) for k, vals in PRESETS.items())
    add_flag(g, "preset", f"a fine-tuning plan; flags given explicitly win ({presets})")
    add_flag(g, "batch_size", "per process")
    add_flag(g, "eval_batch_size", f"batch for validation and test; unset: {EVAL_BATCH_SIZE['cpu']} on the CPU "
                                   f"(fits the cache), {EVAL_BATCH_SIZE['gpu']} on a GPU")
    add_flag(g, "lr", "peak learning rate")
    add_flag(g, "optimizer", "AdamW or SGD with Nesterov momentum")
    add_flag(g, "momentum", "SGD momentum (Nesterov)")
    add_flag(g, "weight_decay", f"unset: {', '.join(f'{v:g} for {k}' for k, v in DEFAULT_WEIGHT_DECAY.items())}; "
                                "never on biases or BatchNorm")
    add_flag(g, "epochs", "at most this many epochs (early stopping may end sooner)")
    add_flag(g, "scheduler", "LR schedule over the run")
    add_flag(g, "warmup_epochs", f"linear LR warm-up; unset: {FINETUNE_WARMUP_EPOCHS:g} when fine-tuning, 0 with "
                                 "--from-scratch or onecycle")
    add_flag(g, "min_lr", "cosine: the final LR")
    add_flag(g, "step_size", "step: epochs between decays")
    add_flag(g, "step_gamma", "step: decay factor")
    add_flag(g, "exp_gamma", "exponential: factor per epoch")
    add_flag(g, "plateau_factor", "plateau: decay factor")
    add_flag(g, "plateau_patience", "plateau: epochs to wait")
    add_flag(g, "label_smoothing", "of the training loss only")
    add_flag(g, "ema_decay", "validate, select and save a moving average of the weights, updated with this decay after "
                             "every step (0.999 averages about the last 1,000 steps); 0: off")
    add_flag(g, "max_grad_norm", "clip gradients to this norm")
    add_flag(g, "freeze_conv", "train only the head: the layers from the first fully connected one after the last "
                               "convolution (found from one forward pass); the features stay exactly as loaded")
    add_flag(g, "freeze_bn", "freeze BatchNorm weights and running statistics")
    add_flag(g, "trainable", "train only the layers whose names match these comma-separated patterns, e.g. 'fc*,bn_fc' "
                             "(where --freeze-conv cannot tell a model's head)", metavar="PATTERNS")
    g = p.add_argument_group("distillation (a stronger model teaches this one)")
    add_flag(g, "teacher", "checkpoints of our architectures (e.g. model/resnet20.pt); several: their softmax averaged",
             type=str, nargs="+", metavar="PATH")
    add_flag(g, "kd_alpha", "weight of the teachers' term in the loss (1 - it: the labels')")
    add_flag(g, "kd_temperature", "softmax temperature of teachers and model in that term (higher: softer targets)")

    g = p.add_argument_group("model selection and early stopping (validation split only)")
    add_flag(g, "select", "validation metric that picks the best model")
    add_flag(g, "monitor", "validation metric for early stopping and the plateau scheduler")
    add_flag(g, "patience", "epochs without improvement before stopping")
    add_flag(g, "min_delta", "smallest change that counts")
    add_flag(g, "seed", "shuffling, augmentation, dropout and --from-scratch weights (not the split: --split-seed)")
    add_shared(g, "--tta")
    g = p.add_argument_group("output")
    add_flag(g, "output", "best model; last.pt and metrics.json go beside it")
    add_flag(g, "overwrite", "replace existing output files")
    add_flag(g, "resume", "continue a run from its last.pt (path)")
    add_flag(g, "override_resume", "allow changed hyperparameters on --resume")
    add_flag(g, "logdir", "TensorBoard folder")
    add_flag(g, "run_name", "TensorBoard run folder; unset: time, plan, optimizer, lr and batch size")

    g = p.add_argument_group("hardware")
    add_shared(g, "--device")
    add_flag(g, "amp", "mixed precision; auto: bf16 on CPUs and GPUs that are fast at it (CUDA capability 8.0+), "
                       "fp16 with loss scaling on capability 7.x (V100, T4), else fp32; on Apple MPS fp32, with bf16 "
                       "or fp16 only when asked for")
    add_flag(g, "channels_last", "NHWC memory layout (faster convolutions)", action=argparse.BooleanOptionalAction)
    add_flag(g, "compile", "torch.compile the model")
    add_flag(g, "deterministic", "deterministic kernels, no TF32, no cuDNN autotuning: repeatable on one GPU, a little "
                                 "slower")
    add_flag(g, "sync_bn", "SyncBatchNorm across GPUs (torchrun, CUDA)")
    add_flag(g, "scale_lr", "multiply --lr by the world size (linear scaling)")
    g = p.add_argument_group("console")
    add_flag(g, "quiet", "no progress bars or per-epoch lines")
    add_shared(g, "--debug")
    return p


if __name__ == "__main__":
    sys.exit(main())
