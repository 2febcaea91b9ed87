"""Freezing any model: the head found from one forward pass (module or functional calls), --freeze-conv,
--freeze-bn and --trainable patterns keeping every frozen tensor bit-identical, and the summary line."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RESNET
from foreign import SPECS, import_class, write_script
from torch import nn

from fashion_ft.errors import UsageError, UserError
from fashion_ft.model import apply_freezing, build_model, set_train_mode, trainable_summary


def params_of(*modules: str) -> set[str]:
    return {f"{m}.{w}" for m in modules for w in ("weight", "bias")}


class Net(nn.Module):
    """The given members and forward(self, x): the small models of the cases a trace must tell."""

    def __init__(self, forward, **members):
        super().__init__()
        for name, member in members.items():
            setattr(self, name, member)
        self.forward_fn = forward

    def forward(self, x):
        return self.forward_fn(self, x)


MODELS = {
    "cnn3": lambda: build_model("cnn3", {"channels": [8, 16, 16], "hidden": 32}),
    "resnet": lambda: build_model("resnet", TINY_RESNET),
    # a convolution by F.conv2d on a bare Parameter (no nn.Conv2d a module hook could see), then a linear head
    "functional conv": lambda: Net(lambda m, x: m.fc(F.relu(F.conv2d(x, m.w, padding=1)).mean((2, 3))),
                                   w=nn.Parameter(torch.randn(4, 1, 3, 3) * 0.3), fc=nn.Linear(4, 10)),
    # an nn.Conv2d body with a BatchNorm right after it (part of the features), a head x @ W.t() + b
    "functional head": lambda: Net(lambda m, x: F.relu(m.bn(m.conv(x))).mean((2, 3)) @ m.head_w.t() + m.head_b,
                                   conv=nn.Conv2d(1, 4, 3, padding=1), bn=nn.BatchNorm2d(4),
                                   head_w=nn.Parameter(torch.randn(10, 4) * 0.3), head_b=nn.Parameter(torch.zeros(10))),
    "no conv": lambda: Net(lambda m, x: m.fc2(F.relu(m.fc1(x.flatten(1)))), fc1=nn.Linear(784, 32),
                           fc2=nn.Linear(32, 10)),
    # the scores come from a convolution: nothing fully connected after it
    "all conv": lambda: Net(lambda m, x: m.conv2(F.relu(m.conv1(x))).mean((2, 3)), conv1=nn.Conv2d(1, 8, 3, padding=1),
                            conv2=nn.Conv2d(8, 10, 1)),
    # one parameter used on both sides of the boundary
    "shared gain": lambda: Net(lambda m, x: m.fc(m.conv(x * m.gain).mean((2, 3))) * m.gain,
                               gain=nn.Parameter(torch.ones(1)), conv=nn.Conv2d(1, 4, 3), fc=nn.Linear(4, 10)),
}


@pytest.fixture(scope="module")
def foreign_class(tmp_path_factory):
    """name -> the class of foreign network `name`, imported from its script as a user's tool would."""
    folder = tmp_path_factory.mktemp("foreign")
    classes = {name: import_class(write_script(name, folder), spec.cls) for name, spec in SPECS.items()}
    return classes.__getitem__


def make(name: str, foreign_class) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]() if name in MODELS else foreign_class(name)(**SPECS[name].kwargs)


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


@pytest.mark.parametrize("case", CASES)
def test_frozen_tensors_stay_bit_identical_and_the_rest_trains(case, foreign_class):
    """Every frozen parameter and buffer (running statistics, num_batches_tracked) as it was after two SGD steps, every
    other one trained; the record survives .double() (new buffers); the trace leaves every train/eval flag as it was."""
    freeze_conv, freeze_bn, patterns, trainable = CASES[case]
    model = make(case.split(",")[0], foreign_class)
    model.train()(torch.randn(16, 1, 28, 28))  # BatchNorm statistics that are not the initial ones
    next(model.children()).eval()
    flags = {name: m.training for name, m in model.named_modules()}
    apply_freezing(model, freeze_conv, freeze_bn, patterns)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    set_train_mode(model.double())
    assert model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(8, 1, 28, 28, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    buffers, trained_modules = dict(model.named_buffers()), {n.rpartition(".")[0] for n in trainable}
    for key, after in model.state_dict().items():  # a buffer trains with its module's parameters
        trains = key in trainable or (key in buffers and key.rpartition(".")[0] in trained_modules)
        assert torch.equal(before[key], after) != trains, f"{key} {'did not train' if trains else 'moved'}"


@pytest.mark.parametrize("name, trainable, error, match", [
    ("no conv", None, UserError, "no convolution"), ("all conv", None, UserError, "no fully connected layer after"),
    ("shared gain", None, UserError, "gain used both before and after"),
    ("a", ["fc*", "head*"], UsageError, r"'head\*' matches no layer .*: conv1, bn1, .*fc1, bn_fc, dropout, fc2"),
    ("a", ["fc*", "["], UsageError, r"'\[' matches no layer"),
])
def test_what_cannot_be_frozen_is_one_error_naming_the_trainable_flag(foreign_class, name, trainable, error, match):
    """No head to find (--freeze-conv): exit 1; a pattern matching nothing: exit 2, listing the layers."""
    with pytest.raises(UserError, match=match) as info:
        apply_freezing(make(name, foreign_class), freeze_conv=not trainable, freeze_bn=False, trainable=trainable)
    assert type(info.value) is error and "--trainable" in str(info.value)


@pytest.mark.filterwarnings("error")  # and no warning where --freeze-bn does change something, or is not given
def test_freeze_bn_on_a_model_without_batchnorm_says_it_changes_nothing():
    with pytest.warns(UserWarning, match="no BatchNorm layer, so --freeze-bn changes nothing"):
        apply_freezing(make("functional conv", None), freeze_conv=False, freeze_bn=True)
    apply_freezing(make("functional conv", None), freeze_conv=False, freeze_bn=False)
    apply_freezing(build_model("cnn3"), freeze_conv=False, freeze_bn=True)


@pytest.mark.parametrize("name, prepare, summary", [
    ("cnn3", lambda m: apply_freezing(m, True, False), "classifier (4,970 of 8,578 parameters)"),
    ("a", lambda m: None, "all (7,450 of 7,450 parameters)"),
    ("a", lambda m: apply_freezing(m, True, False), "fc1, bn_fc, fc2 (1,450 of 7,450 parameters)"),
    ("a", lambda m: m.requires_grad_(False), "nothing (0 of 7,450 parameters)"),
    ("functional head", lambda m: apply_freezing(m, True, False), "head_w, head_b (50 of 98 parameters)"),
])
def test_trainable_summary_names_the_fewest_modules_holding_what_trains(foreign_class, name, prepare, summary):
    model = make(name, foreign_class)
    prepare(model)
    assert trainable_summary(model) == f"trainable: {summary}"
