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
import json
import sys
from pathlib import Path

from fashion_ft import config  # neither config nor errors imports torch: main() guards signals first
from fashion_ft.errors import SignalGuard, UsageError, printable

# flag -> (test, what it must be), as config.LIMITS
LIMITS = {"batches": config.AT_LEAST_1, "batch_size": config.AT_LEAST_1,
          "min_accuracy": (lambda v: 0 <= v <= 1, "a fraction in [0, 1] (0.9 for 90%)")}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-path", nargs="+", action="extend", default=None,
                   help=f"one or more checkpoints (the flag may repeat); several also report their ensemble "
                        f"(default: {config.Config.model_path})")
    config.add_shared(p, "--model-def", "--model-kwargs", "--normalize", "--data-dir", "--download", "--device",
                      "--tta", "--trust-pickle", "--debug")
    p.add_argument("--batches", type=int, default=3, help="test batches for the quick eval")
    p.add_argument("--batch-size", type=int, default=256, help="images per eval batch")
    p.add_argument("--full", action="store_true", help="evaluate on all 10,000 test images")
    p.add_argument("--min-accuracy", type=float, default=0.5, help="quick-eval accuracy below this fraction fails")
    p.add_argument("--amp", choices=config.choices()["amp"], default="off",
                   help="precision of the quick eval (off: exact fp32; fp16 needs a CUDA GPU, or Apple MPS with "
                        "torch 2.8+). The train step always uses the precision finetune_gpu.py's --amp auto picks")
    p.add_argument("--require-gpu", action="store_true", help="fail when no CUDA GPU is available")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return p


def check_and_print(argv) -> int:
    from fashion_ft import model, preflight

    args = get_args_parser().parse_args(argv)
    for name, (ok, what) in LIMITS.items():
        if not ok(getattr(args, name)):
            raise UsageError(f"{config.flag_of(name)}: must be {what}, got {getattr(args, name)}")
    args.model_path = args.model_path or [config.Config.model_path]
    args.definition = model.parse(args.model_def) if args.model_def is not None else None
    config.check_normalize(args.normalize)
    # under --json what the user's module prints goes to stderr, so that stdout is one document
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report = preflight.run_checks(args)
    failed = [c["name"] for c in report.checks if not c["ok"]]
    if args.json:  # strict: Report.run has turned every NaN/Inf into null with its reason
        print(json.dumps({"passed": not failed, "checks": report.checks}, indent=2, allow_nan=False))
    else:
        for c in report.checks:
            print(printable(f"[{'PASS' if c['ok'] else 'FAIL'}] {c['name']:<16} {c['detail']}"))
        print(f"{len(failed)} of {len(report.checks)} checks failed: {', '.join(failed)}" if failed
              else f"all {len(report.checks)} checks passed")
    return 1 if failed else 0


def main(argv=None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    with SignalGuard() as signals:  # before torch is imported: Ctrl-C at any moment is one line
        return config.run(lambda: check_and_print(argv), debug, signals=signals)


if __name__ == "__main__":
    sys.exit(main())
