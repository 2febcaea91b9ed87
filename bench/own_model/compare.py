"""The accuracy of each model on the two stratified halves of the test images that `--val-from test-half`
uses (split seed 42 unless given): the half that a test-half run selects on, and the half it never sees.
Models of any validation source compare on the same held-out half. Every model after the first is set
against the first on the held-out half with McNemar's exact test: the images only one of the two gets right.

    python -m bench.own_model.compare MODEL.pt [MODEL.pt ...] --model-def bench/own_model/mnist-gpu.py:Net \
        --normalize 0.1307 0.3081
"""

import argparse
import math
import sys

import torch

from fashion_ft import config, model
from fashion_ft.checkpoint import load_checkpoint
from fashion_ft.data import DeviceData, given_for, load_split, test_halves
from fashion_ft.engine import ComputeSettings, logit_metrics, predict_logits
from fashion_ft.system import FP32

CPU = torch.device("cpu")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.own_model.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="+", help="checkpoints to measure")
    p.add_argument("--split-seed", type=int, default=42, help="the seed of the halves")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    config.add_shared(p, "--model-def", "--model-kwargs", "--normalize")  # applied as test_model.py applies it
    return p.parse_args(argv)


def main(argv=None) -> int:
    def body() -> int:
        args = parse_args(argv)
        test = DeviceData.create(*load_split(args.data_dir, "test"), CPU)
        held_out, selection = test_halves(test.labels, args.split_seed)
        halves = {"held-out half": held_out, "selection half": selection, "all": slice(None)}
        print("| model | " + " | ".join(f"{name} ({len(test.labels[idx])})" for name, idx in halves.items())
              + " | against the first, held-out half |")
        print("|---|---:|---:|---:|---|")
        definition = model.parse(args.model_def) if args.model_def else None
        first = None
        for path in args.models:
            ckpt = load_checkpoint(path, model_def=definition, model_kwargs=args.model_kwargs)
            mean, std = given_for(args.normalize, ckpt.normalize_recorded, len(args.models)) or (ckpt.mean, ckpt.std)
            logits = predict_logits(ckpt.build(), test.images, ComputeSettings(CPU, FP32, mean, std), 1000)
            accuracies = [logit_metrics(logits[idx], test.labels[idx])[1] for idx in halves.values()]
            right = (logits.argmax(1) == test.labels)[held_out]
            first = right if first is None else first
            print(f"| {path} | " + " | ".join(f"{100 * a:.2f}%" for a in accuracies) + f" | {mcnemar(first, right)} |")
        return 0

    return config.run(body, debug=False)


def mcnemar(first: torch.Tensor, other: torch.Tensor) -> str:
    """McNemar's exact test: under 'no difference', the images that only one model gets right fall to
    either side as fair coin flips."""
    gained, lost = int((other & ~first).sum()), int((first & ~other).sum())
    n = gained + lost
    if n == 0:
        return "the same predictions"
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n)
    return f"+{gained} / -{lost} images, p = {p:.3f}"


if __name__ == "__main__":
    sys.exit(main())
