#!/usr/bin/env python3
"""Pre-flight check of a Fashion-MNIST checkpoint: file, safe load, architecture, GPU, forward pass,
one training step as fine-tuning would take it on this device, a quick evaluation on real test images,
speed and memory.

    python test_model.py                                  # the shipped base model, 3 batches
    python test_model.py --model-path a.pt b.pt --full    # two models and their ensemble, all 10,000
    python test_model.py --json --require-gpu

Exit codes: 0 every check passed, 1 a check failed, 2 bad usage, 130/143 interrupted (SIGINT/SIGTERM).
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import warnings
from pathlib import Path


def bounded(convert, noun: str, ok, rule: str):
    """An argparse type: convert(text), which must satisfy ok, else a one-line usage error."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value
    return parse


positive_int = bounded(int, "a whole number", lambda v: v >= 1, "must be >= 1")
fraction = bounded(float, "a number", lambda v: 0 <= v <= 1, "must be a fraction between 0 and 1 (0.9 for 90%)")


def get_args_parser() -> argparse.ArgumentParser:
    from fashion_ft.cli import add_shared
    from fashion_ft.config import Config
    from fashion_ft.system import AMP_MODES  # imports torch: after main() installed the signal handlers

    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-path", nargs="+", action="extend", default=None,
                   help=f"one or more checkpoints (the flag may repeat); several also report their ensemble "
                        f"(default: {Config.model_path})")
    add_shared(p, "--model-def", "--model-kwargs", "--normalize", "--data-dir", "--download")
    p.add_argument("--batches", type=positive_int, default=3, help="test batches for the quick eval")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per eval batch")
    p.add_argument("--full", action="store_true", help="evaluate on all 10,000 test images")
    p.add_argument("--min-accuracy", type=fraction, default=0.5,
                   help="quick-eval accuracy below this fraction (0..1) fails")
    add_shared(p, "--device")
    p.add_argument("--amp", choices=AMP_MODES, default="off",
                   help="precision of the quick eval (off: exact fp32; fp16 needs a CUDA GPU, or Apple MPS with torch 2.8+). The train step "
                        "always uses the precision finetune_gpu.py's --amp auto picks on this device")
    add_shared(p, "--tta")
    p.add_argument("--require-gpu", action="store_true", help="fail when no CUDA GPU is available")
    add_shared(p, "--trust-pickle")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    add_shared(p, "--debug")
    return p


def check_model(report, path: Path, args, rt_eval, data, training_sample):
    """The per-model checks; returns the quick eval's probabilities (or None)."""
    from fashion_ft import preflight as pf
    from fashion_ft.normalization import given_for

    prefix = f"{path}: " if len(args.model_path) > 1 else ""
    # each of these runs only if the one before passed
    ckpt = (report.run(prefix + "file", pf.check_file, path)
            and report.run(prefix + "load", pf.check_load, path, args.trust_pickle, args.definition, args.model_kwargs))
    if ckpt is None:
        return None
    model = report.run(prefix + "architecture", pf.check_arch, ckpt)
    finite = report.run(prefix + "weights finite", pf.check_finite, ckpt)
    if model is None or finite is None:
        return None
    model = model.to(rt_eval.device)
    given = given_for(args.normalize, ckpt.normalize_recorded, len(args.model_path))
    mean, std = given or (ckpt.mean, ckpt.std)
    rt = dataclasses.replace(rt_eval, mean=mean, std=std)
    report.run(prefix + "forward pass", pf.check_forward, model, rt)
    if not (given or ckpt.normalize_recorded):
        sample = training_sample()
        if sample is None:
            report.skip(prefix + "normalisation", "no training images")
        else:
            report.run(prefix + "normalisation", pf.check_normalization, model, sample, mean, std)
    report.run(prefix + "train step", pf.check_train_step, model, data, mean, std, rt.device)
    if data is None:
        report.skip(prefix + "quick eval", "no test data")
        return None
    probs = report.run(prefix + "quick eval", pf.check_eval, model, rt, data, args.batch_size, args.min_accuracy)
    split = ckpt.split or {}
    if probs is not None and args.full and split.get("validation") == "test-half":
        report.run(prefix + "held-out half", pf.check_held_out, probs, data.labels, split["seed"])
    return probs


def resolve_runtime(args):
    """How the models are evaluated, less the normalisation that each checkpoint brings; a bad --device
    or --amp is a usage error (exit 2)."""
    from fashion_ft.engine import ComputeSettings
    from fashion_ft.system import resolve_amp, resolve_device

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the device check reports a CPU fall-back (and why) itself
        device = resolve_device(args.device)
    return ComputeSettings(device, resolve_amp(args.amp, device), mean=0.0, std=1.0, tta_flip=args.tta == "flip")


def run_checks(args):
    from fashion_ft import preflight as pf
    from fashion_ft.normalization import SAMPLE_IMAGES
    from fashion_ft.system import reset_peak_memory

    report = pf.Report(debug=args.debug)
    rt_eval = resolve_runtime(args)
    device = rt_eval.device
    report.run("device", pf.check_device, device, args.require_gpu, args.device == "auto")
    n = None if args.full else args.batches * args.batch_size
    data = report.run("test data", pf.check_data, args.data_dir, "test", n, device, args.download)
    # read once, and only for a model whose file does not record its normalisation
    training_sample = functools.cache(
        lambda: report.run("training images", pf.check_data, args.data_dir, "train", SAMPLE_IMAGES, device))
    probs = []
    for path in map(Path, args.model_path):
        reset_peak_memory(device)  # per model, so that each reports its own GPU peak
        probs.append(check_model(report, path, args, rt_eval, data, training_sample))
        report.run(f"{path}: memory" if len(args.model_path) > 1 else "memory", pf.check_memory, device)
    if len(probs) > 1:
        if all(p is not None for p in probs):
            report.run("ensemble", pf.check_ensemble, probs, data.labels)
        else:
            report.skip("ensemble", "no test data" if data is None else "a model failed its checks")
    return report


def print_text(report) -> None:
    from fashion_ft.cli import printable

    for check in report.checks:
        print(printable(f"[{'PASS' if check.ok else 'FAIL'}] {check.name:<16} {check.detail}"))
    failed = [c.name for c in report.checks if not c.ok]
    total = len(report.checks)
    print(f"{len(failed)} of {total} checks failed: {', '.join(failed)}" if failed else f"all {total} checks passed")


def check_and_print(argv) -> int:
    from fashion_ft import userdef
    from fashion_ft.config import Config, check_normalize

    args = get_args_parser().parse_args(argv)
    args.model_path = args.model_path or [Config.model_path]
    args.definition = userdef.parse(args.model_def) if args.model_def is not None else None
    check_normalize(args.normalize)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report = run_checks(args)  # under --json, what the user's module prints goes to stderr: stdout is one document
    if args.json:  # strict JSON: Report.to_dict has turned every NaN/Inf into null with its reason
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        print_text(report)
    return 0 if report.passed else 1


def main(argv=None) -> int:
    from fashion_ft import cli
    from fashion_ft.signals import SignalGuard

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    with SignalGuard() as signals:  # before torch is imported: Ctrl-C at any moment is one line
        return cli.run(lambda: check_and_print(argv), debug, signals=signals)


if __name__ == "__main__":
    sys.exit(main())
