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
from typing import TYPE_CHECKING

from fashion_ft.config import (
    PRESETS,
    SECTIONS,
    Config,
    add_flag,
    check_conflicts,
    check_resume,
    default_run_name,
    resolve_defaults,
    restored,
    validate,
)
from fashion_ft.errors import UsageError, UserError

if TYPE_CHECKING:
    from fashion_ft.checkpoint import LoadedCheckpoint

DEFAULTS = Config()
# What the namespace holds for a flag not given: argparse writes a default only where the namespace has no value
UNSET = object()


def main(argv=None) -> int:
    from fashion_ft import config
    from fashion_ft.errors import SignalGuard

    def body() -> int:
        cfg, resumed = build_config(argv)
        from fashion_ft.trainer import fine_tune  # imported late: a usage error is reported fast

        fine_tune(cfg, resumed, signals)
        return 0

    with SignalGuard() as signals:  # from the first line: a signal during set-up counts as one in training
        return config.run(body, debug="--debug" in (sys.argv[1:] if argv is None else argv), signals=signals)


def build_config(argv) -> tuple[Config, "LoadedCheckpoint | None"]:
    """argv, parsed once, as the run's Config: the defaults (on --resume, last.pt's config), then the
    preset's values, then the flags given, which win; checked before any work. Also last.pt, read."""
    unset = argparse.Namespace(**{f.name: UNSET for f in dataclasses.fields(Config)})
    given = {k: v for k, v in vars(get_args_parser().parse_args(argv, unset)).items() if v is not UNSET}
    resumed, start = None, DEFAULTS
    if given.get("resume"):
        resumed, start = load_resume(given["resume"], given.get("model_def"))
    preset = given.get("preset")  # a resumed run's own preset is in its config already
    cfg = resolve_defaults(Config(**{**dataclasses.asdict(start), **PRESETS.get(preset, {}), **given}))
    validate(cfg)
    if resumed:
        check_resume(start, cfg)
    else:
        check_conflicts(cfg, given, preset)
        if cfg.from_scratch:
            check_from_scratch_model(cfg)
    run_name = cfg.run_name or default_run_name(cfg)
    return dataclasses.replace(cfg, output=resolve_output(cfg, given), run_name=run_name), resumed


def load_resume(path: str, model_def: str | None) -> tuple["LoadedCheckpoint", Config]:
    """last.pt, checked, and the Config it saved; a user's class is built from --model-def only
    (never from the record)."""
    from fashion_ft import model
    from fashion_ft.checkpoint import RESUME_HINT, load_checkpoint, validate_resumable
    from fashion_ft.errors import resolve_path

    resolve_path(Path(path), "--resume")  # a symlink loop is worded as for every other path
    definition = model.parse(model_def) if model_def else None
    resumed = load_checkpoint(path, refusal_hint=RESUME_HINT, model_def=definition)
    validate_resumable(path, resumed.meta)
    try:  # what it restores passes the checks argv does
        saved = restored(resumed.meta["config"])
        validate(saved)
    except UsageError as exc:
        raise UserError(f"{path}: its saved config is not valid ({exc}); start a new run from its weights "
                        "with --model-path instead") from None
    return resumed, saved


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
    """Every flag, one per Config field; its help, default, type and choices are the field's."""
    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = p
    for field in dataclasses.fields(Config):
        if field.name in SECTIONS:
            group = p.add_argument_group(SECTIONS[field.name])
        add_flag(group, field.name)
    return p


if __name__ == "__main__":
    sys.exit(main())
