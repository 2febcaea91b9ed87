"""Which input normalisation a model was trained with, when its file does not say.

A wrong normalisation fails silently and badly (a model of 93% scores 34% under another one), so a
model without a record is tried under the common candidates on a few hundred training images, never
the test set. The tools only ever suggest: the user's --normalize, or the default, is what runs.
"""

import torch
from torch import nn

from .data import MEAN, STD, make_batch

CANDIDATES = {  # name -> (mean, std) of the pixels scaled to [0, 1]
    "Fashion-MNIST's": (MEAN, STD),
    "MNIST's": (0.1307, 0.3081),
    "[0, 1] (no normalisation)": (0.0, 1.0),
    "[-1, 1]": (0.5, 0.5),
}
SAMPLE_IMAGES = 512  # one standard error is about 2 points: enough to tell 34% from 93%
# The rule: another candidate scores at least 30 points more than the normalisation in use (a real model
# of 93% scored 34% under the wrong one; two right ones never differ by that much).
CLEARLY_BETTER = 0.30


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float) -> float:
    """Accuracy of `model` (eval mode, on its own device) on uint8 `images` (N x 1 x 28 x 28) under (mean, std)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = make_batch(images.to(device), None, None, mean, std)
        return (model(x).argmax(1).cpu() == labels).float().mean().item()
    finally:
        model.train(was_training)


def given_for(normalize: tuple[float, float] | None, recorded: bool, models: int) -> tuple[float, float] | None:
    """--normalize as it applies to one of `models` files: a single model always takes it; in a set, only the
    files that record none do (a user's model beside ours)."""
    return normalize if models == 1 or not recorded else None


def compare(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
            current: tuple[float, float]) -> dict[tuple[float, float], float]:
    """{(mean, std): accuracy} for the normalisation in use and every candidate, on the first images."""
    images, labels = images[:SAMPLE_IMAGES], labels[:SAMPLE_IMAGES]
    return {norm: accuracy(model, images, labels, *norm) for norm in {current, *CANDIDATES.values()}}


def suggestion(scores: dict[tuple[float, float], float], current: tuple[float, float]) -> str | None:
    """One line naming a clearly better candidate by the rule above, or None."""
    best = max(scores, key=scores.get)
    if scores[best] < scores[current] + CLEARLY_BETTER:
        return None
    name = next((n for n, norm in CANDIDATES.items() if norm == best), f"mean {best[0]} std {best[1]}")
    return (f"this model looks trained with {name} normalisation: {scores[best]:.0%} with --normalize "
            f"{best[0]:g} {best[1]:g}, {scores[current]:.0%} with the one in use ({current[0]:g} {current[1]:g}) "
            f"on {SAMPLE_IMAGES} training images")
