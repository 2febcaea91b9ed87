"""Freezing any model: the head found from one forward pass (module or functional calls), --freeze-conv,
--freeze-bn and --trainable patterns keeping every frozen tensor bit-identical, and the summary line."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RESNET, head_parameters
from foreign import SPECS, import_class, write_script
from torch import nn

from fashion_ft.errors import UsageError, UserError
from fashion_ft.model import apply_freezing, build_model, set_train_mode, trainable_summary


def params_of(*modules: str) -> set[str]:
    return {f"{m}.{w}" for m in modules for w in ("weight", "bias")}


# ---------------------------------------------------------------- small models of the cases a trace must tell

class FunctionalConv(nn.Module):
    """A convolution by F.conv2d on a bare Parameter (no nn.Conv2d a module hook could see), then a linear head."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 1, 3, 3) * 0.3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(F.conv2d(x, self.w, padding=1)), 1).flatten(1)
        return self.fc(x)


class FunctionalMatmulHead(nn.Module):
    """An nn.Conv2d body and a head written as x @ W.t() + b on bare Parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)  # right after the last conv: part of the features
        self.head_w = nn.Parameter(torch.randn(10, 4) * 0.3)
        self.head_b = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
        return x @ self.head_w.t() + self.head_b


class NoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class AllConv(nn.Module):
    """The scores come from a convolution: nothing fully connected after it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 10, 1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.conv2(F.relu(self.conv1(x))), 1).flatten(1)


class SharedGain(nn.Module):
    """One parameter used on both sides of the boundary."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 10)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.conv(x * self.gain), 1).flatten(1)
        return self.fc(x) * self.gain


@pytest.fixture(scope="module")
def foreign_class(tmp_path_factory):
    """name -> the class of foreign network `name`, imported from its script as a user's tool would."""
    folder = tmp_path_factory.mktemp("foreign")
    classes = {name: import_class(write_script(name, folder), spec.cls) for name, spec in SPECS.items()}
    return classes.__getitem__


def make(name: str, foreign_class) -> nn.Module:
    torch.manual_seed(0)
    builders = {
        "cnn3": lambda: build_model("cnn3", {"channels": [8, 16, 16], "hidden": 32}),
        "resnet": lambda: build_model("resnet", TINY_RESNET),
        "functional conv": FunctionalConv,
        "functional head": FunctionalMatmulHead,
    }
    if name in builders:
        return builders[name]()
    return foreign_class(name)(**SPECS[name].kwargs)


A_ALL = params_of("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc1", "bn_fc", "fc2")
# model: (freeze_conv, freeze_bn, --trainable patterns, the parameters that still train)
CASES = {
    # --freeze-conv: the head a person would name, as modules (or bare parameters)
    "cnn3": (True, False, None, params_of("classifier.2", "classifier.5")),
    "resnet": (True, False, None, params_of("classifier.0")),
    "a": (True, False, None, params_of("fc1", "bn_fc", "fc2")),  # BatchNorm1d in the head; bn3 after the convs is not
    "b": (True, False, None, params_of("fc1", "fc2")),
    "c": (True, False, None, params_of("head.2")),  # registered before the body
    "d": (True, False, None, params_of("classifier")),
    "functional conv": (True, False, None, params_of("fc")),  # F.conv2d on a bare parameter of the model itself
    "functional head": (True, False, None, {"head_w", "head_b"}),  # x @ W.t() + b
    "a, --freeze-bn": (False, True, None, A_ALL - params_of("bn1", "bn2", "bn3", "bn_fc")),
    "a, both": (True, True, None, params_of("fc1", "fc2")),
    # --trainable: a module names what it holds; BatchNorm statistics it does not name stay as loaded
    "a, fc* bn_fc": (False, False, ["fc*", "bn_fc"], params_of("fc1", "bn_fc", "fc2")),
    "a, fc*": (False, False, ["fc*"], params_of("fc1", "fc2")),
    "cnn3, classifier": (False, False, ["classifier"], params_of("classifier.2", "classifier.5")),
    "cnn3, two layers": (False, False, ["features.0", "classifier.5"], {"features.0.weight", *params_of("classifier.5")}),
    "c, head": (False, False, ["head"], params_of("head.2")),
    "functional conv, w": (False, False, ["w"], {"w"}),  # a parameter of the model itself, by its own name
}


def sgd_steps(model: nn.Module, steps: int = 2) -> None:
    """SGD with momentum on random images in train mode, as set_train_mode leaves the model."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 28, 28, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("case", CASES)
def test_frozen_tensors_stay_bit_identical_and_the_rest_trains(case, foreign_class):
    """Every frozen parameter and buffer (running statistics, num_batches_tracked) as it was, every other
    one trained; the record survives .double(), which replaces the buffers; the model keeps its own flag."""
    freeze_conv, freeze_bn, patterns, trainable = CASES[case]
    model = make(case.split(",")[0], foreign_class)
    model.train()(torch.randn(16, 1, 28, 28))  # BatchNorm statistics that are not the initial ones
    apply_freezing(model, freeze_conv, freeze_bn, patterns)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    set_train_mode(model.double())
    assert model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sgd_steps(model)
    buffers, trained_modules = dict(model.named_buffers()), {n.rpartition(".")[0] for n in trainable}
    for key, after in model.state_dict().items():  # a buffer trains with its module's parameters
        trains = key in trainable or (key in buffers and key.rpartition(".")[0] in trained_modules)
        assert torch.equal(before[key], after) != trains, f"{key} {'did not train' if trains else 'moved'}"


@pytest.mark.parametrize("name", ["cnn3", "resnet"])
def test_our_networks_head_is_their_classifier(name):
    model = make(name, None)
    assert head_parameters(model) == {f"classifier.{n}" for n, _ in model.classifier.named_parameters()}


def test_the_trace_leaves_every_train_eval_flag_as_it_was(foreign_class):
    model = make("a", foreign_class).train()
    model.bn1.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    head_parameters(model)
    assert {name: m.training for name, m in model.named_modules()} == flags


@pytest.mark.parametrize("cls, message", [(NoConv, "no convolution"), (AllConv, "no fully connected layer after"),
                                          (SharedGain, "gain used both before and after")])
def test_a_model_without_a_head_to_find_is_a_user_error_naming_the_pattern_flag(cls, message):
    with pytest.raises(UserError, match=message) as info:
        apply_freezing(cls(), freeze_conv=True, freeze_bn=False)
    assert "--trainable PATTERN" in str(info.value) and info.value.exit_code == 1


@pytest.mark.parametrize("pattern", ["head*", "["])
def test_a_pattern_matching_nothing_exits_2_listing_the_layers(foreign_class, pattern):
    with pytest.raises(UsageError, match="its layers are: conv1, bn1, .*fc1, bn_fc, dropout, fc2") as info:
        apply_freezing(make("a", foreign_class), False, False, ["fc*", pattern])
    assert info.value.exit_code == 2 and repr(pattern) in str(info.value)


def test_freeze_bn_on_a_model_without_batchnorm_says_it_changes_nothing():
    with pytest.warns(UserWarning, match="no BatchNorm layer, so --freeze-bn changes nothing"):
        apply_freezing(FunctionalConv(), freeze_conv=False, freeze_bn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_freezing(FunctionalConv(), freeze_conv=False, freeze_bn=False)
        apply_freezing(build_model("cnn3"), freeze_conv=False, freeze_bn=True)


def test_trainable_summary(foreign_class):
    cnn3 = build_model("cnn3")
    apply_freezing(cnn3, True, False)
    total = sum(p.numel() for p in cnn3.parameters())
    head = sum(p.numel() for p in cnn3.classifier.parameters())
    assert trainable_summary(cnn3) == f"trainable: classifier ({head:,} of {total:,} parameters)"

    net = make("a", foreign_class)
    assert trainable_summary(net) == "trainable: all (7,450 of 7,450 parameters)"
    apply_freezing(net, True, False)
    assert trainable_summary(net) == "trainable: fc1, bn_fc, fc2 (1,450 of 7,450 parameters)"
    net.requires_grad_(False)
    assert trainable_summary(net) == "trainable: nothing (0 of 7,450 parameters)"

    mixed = FunctionalMatmulHead()
    apply_freezing(mixed, True, False)
    assert trainable_summary(mixed) == "trainable: head_w, head_b (50 of 98 parameters)"
