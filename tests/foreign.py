"""Foreign networks, with no fashion_ft code at all: a user's training script (model class, argparse main)
written to disk, its class imported from that file, trained briefly with a plain PyTorch loop, saved the way
users save and measured by the user's own evaluation. Tests check our tools on models they have never seen.
"""

import ast
import importlib.util
import itertools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MNIST_NORM = (0.1307, 0.3081)  # what users copy from the MNIST examples
FASHION_NORM = (0.2860, 0.3530)  # Fashion-MNIST's own statistics

# If a script's main ever runs, it leaves this file next to itself: tests prove that importing it did not.
MARKER = "MAIN_RAN"

# Every script: the user's imports, the model, and a main that would train, fenced off so that it can be seen
# if it ever runs.
_SCRIPT = '''\
import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

{body}

def main():
    parser = argparse.ArgumentParser(description="train on MNIST-like data")
    parser.add_argument("--epochs", type=int, default=14)
    parser.parse_args()
    # normalise like the user does: (x / 255 - {mean}) / {std}
    Path(__file__).with_name("{marker}").write_text("main() ran")
    raise SystemExit("this script's main() must never run when its model is imported")


if __name__ == "__main__":
    main()
'''

# (a) a BatchNorm CNN with global average pooling and a BatchNorm1d head, MNIST normalisation, log_softmax:
# the class of the user's script of the results (bench/own_model/mnist-gpu.py), so that the tests and the
# measured row are one network (the tests narrow it through its kwargs).
OWN_MODEL_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "own_model" / "mnist-gpu.py"


def _class_source(path: Path, name: str) -> str:
    text = path.read_text()
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == name)
    return "\n" + ast.get_source_segment(text, node) + "\n"


_MNIST_GPU = _class_source(OWN_MODEL_SCRIPT, "Net")

# (b) the pytorch/examples MNIST network, narrowed: no BatchNorm, no constructor arguments.
_CLASSIC = '''
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.conv2 = nn.Conv2d(4, 8, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(8 * 12 * 12, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)
'''

# (c) the head is registered before the body, so "the last module registered" is not the classifier;
# the file holds a second model (an nn.Sequential subclass), so "the one nn.Module in the file" is ambiguous.
_HEAD_FIRST = '''
class HeadFirstNet(nn.Module):
    def __init__(self, channels=16, num_classes=10):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(channels * 7 * 7, num_classes))
        self.body = nn.Sequential(
            nn.Conv2d(1, channels // 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels // 2, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )

    def forward(self, x):
        return self.head(self.body(x))


class TinySequential(nn.Sequential):
    def __init__(self, num_classes=10):
        super().__init__(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))
'''

# (d) an ordinary CNN returning logits, flattened with the common `.view` (which channels_last input breaks);
# the user saved it through nn.DataParallel (on a CPU, training through it is training the bare model).
_DP_MODEL = '''
class SmallCNN(nn.Module):
    def __init__(self, channels=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * channels * 7 * 7, 10)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))
'''


@dataclass(frozen=True)
class Spec:
    file: str
    cls: str
    kwargs: dict
    mean: float
    std: float
    container: str  # "bare": torch.save(state_dict); "model_state_dict": {"model_state_dict": ..., "epoch": n}
    log_softmax: bool  # the model returns log-probabilities (trained with nll_loss) rather than logits
    body: str


SPECS = {
    "a": Spec("mnist-gpu.py", "Net", {"width": 8, "hidden": 32, "dropout": 0.25}, *MNIST_NORM, "bare", True,
              _MNIST_GPU),
    "b": Spec("classic_mnist.py", "Net", {}, *FASHION_NORM, "bare", True, _CLASSIC),
    "c": Spec("head_first.py", "HeadFirstNet", {"channels": 16}, *FASHION_NORM, "bare", False, _HEAD_FIRST),
    "d": Spec("dp_model.py", "SmallCNN", {"channels": 8}, *FASHION_NORM, "model_state_dict", False, _DP_MODEL),
}


def write_script(name: str, folder: Path) -> Path:
    """Network `name`'s training script, written into `folder`."""
    spec = SPECS[name]
    path = Path(folder) / spec.file
    path.write_text(_SCRIPT.format(body=spec.body, mean=spec.mean, std=spec.std, marker=MARKER))
    return path


def import_class(path: Path, cls: str):
    """Import a script from its file as a user's tool would (not as __main__), leaving no __pycache__ by it."""
    module_name = "user_" + "".join(c if c.isalnum() else "_" for c in Path(path).stem)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return getattr(module, cls)


@dataclass(frozen=True)
class Foreign(Spec):
    """Network `name` as its user left it: the script at `file`, the `weights` saved beside it, and their
    `accuracy` by the user's own evaluation (`evaluate`, their normalisation) on the test images given."""
    file: Path
    name: str
    weights: Path
    accuracy: float

    @property
    def marker(self) -> Path:
        return self.file.with_name(MARKER)

    def load_class(self):
        return import_class(self.file, self.cls)


def normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 N x 28 x 28 -> float N x 1 x 28 x 28, the way the user's script does it."""
    return ((images.float() / 255 - mean) / std).unsqueeze(1)


@torch.no_grad()
def evaluate(model, images, labels, mean: float, std: float, batch_size: int = 500) -> float:
    """The user's own evaluation: eval mode, their normalisation, argmax accuracy."""
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        x = normalise(images[i:i + batch_size], mean, std)
        correct += (model(x).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(labels)


def train(net, spec: Spec, images, labels, steps: int) -> None:
    """The user's plain loop: Adam, epochs of shuffled batches of 64 until `steps` optimiser steps are done."""
    loss_fn = F.nll_loss if spec.log_softmax else F.cross_entropy
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    # the rate decays to nothing, so the last steps do not leave the weights (and BatchNorm's statistics)
    # halfway between two states: the accuracy comes out steady from seed to seed
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    x_all = normalise(images, spec.mean, spec.std)
    epochs = itertools.chain.from_iterable(torch.randperm(len(labels)).split(64) for _ in itertools.count())
    net.train()
    for _, idx in zip(range(steps), epochs):
        optimizer.zero_grad()
        loss_fn(net(x_all[idx]), labels[idx]).backward()
        optimizer.step()
        scheduler.step()


def make_foreign(name, folder: Path, train_images, train_labels, test_images, test_labels,
                 steps: int = 200, seed: int = 0) -> Foreign:
    """Write network `name`'s script into `folder`, train it briefly, save it as its user would, measure it.
    Images are uint8 N x 28 x 28 tensors, labels int64 (as conftest's read_split gives them).
    200 steps (4 epochs of 3,000 images) give about 80% on the test images, steadily from seed to seed."""
    spec = SPECS[name]
    file = write_script(name, folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # nets this small gain nothing from more threads, and spare ones spin against other tests
    try:
        torch.manual_seed(seed)
        model = import_class(file, spec.cls)(**spec.kwargs)
        train(model, spec, train_images, train_labels, steps)
        accuracy = evaluate(model, test_images, test_labels, spec.mean, spec.std)
    finally:
        torch.set_num_threads(threads)
    weights = Path(folder) / ("model.pt" if spec.container == "bare" else "checkpoint.pth")
    if spec.container == "bare":
        torch.save(model.state_dict(), weights)
    else:  # (d)'s user saves through nn.DataParallel: keys "module.…" (.cpu() undoes its move to a GPU, if any)
        state = torch.nn.DataParallel(model).cpu().state_dict()
        torch.save({"model_state_dict": state, "epoch": steps * 64 // len(train_labels)}, weights)
    return Foreign(**{**asdict(spec), "file": file}, name=name, weights=weights, accuracy=accuracy)
