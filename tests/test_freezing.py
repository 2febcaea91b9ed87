"""Freezing any model: the head found from one forward pass (module or functional calls), --freeze-conv,
--freeze-bn and --trainable patterns keeping every frozen tensor bit-identical, the summary line, and no
training batch of one image through a BatchNorm1d."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RESNET, head_parameters
from foreign import SPECS, import_class, write_script
from torch import nn

from fashion_ft.config import Config
from fashion_ft.engine import ComputeSettings, TrainStep
from fashion_ft.errors import UsageError, UserError
from fashion_ft.freezing import (
    _frozen_tensors,
    _own_tensors,
    apply_freezing,
    set_train_mode,
    trainable_summary,
)
from fashion_ft.model import build_model
from fashion_ft.optim import build_optimizer, build_schedulers
from fashion_ft.system import AmpPolicy


def frozen_modules(model: nn.Module, freeze_conv: bool, freeze_bn: bool, trainable=None) -> list[nn.Module]:
    """Modules whose own parameters and running statistics all stay exactly as loaded: with freeze_conv
    every one outside the head (head_parameters), with freeze_bn every BatchNorm, and with `trainable`
    (fnmatch patterns over module names, e.g. ["fc*", "bn_fc"]) every one that no pattern names (a
    pattern names a module and everything in it)."""
    frozen = _frozen_tensors(model, freeze_conv, freeze_bn, trainable)
    return [m for m in model.modules() if (own := _own_tensors(m)) and all(id(t) in frozen for t in own)]


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


# the head a person would name, as modules (or bare parameters)
HEADS = {
    "cnn3": params_of("classifier.2", "classifier.5"),
    "resnet": params_of("classifier.0"),
    "a": params_of("fc1", "bn_fc", "fc2"),  # BatchNorm1d inside the head; bn3 after the last conv is not
    "b": params_of("fc1", "fc2"),
    "c": params_of("head.2"),  # registered before the body
    "d": params_of("classifier"),
    "functional conv": params_of("fc"),
    "functional head": {"head_w", "head_b"},
}


# ---------------------------------------------------------------- the head

@pytest.mark.parametrize("arch, kwargs", [("cnn3", None), ("resnet", TINY_RESNET)])
def test_our_networks_head_is_exactly_the_classifier(arch, kwargs):
    model = build_model(arch, kwargs)
    assert head_parameters(model) == {f"classifier.{name}" for name, _ in model.classifier.named_parameters()}


@pytest.mark.parametrize("name", HEADS)
def test_head_is_what_a_person_would_name(name, foreign_class):
    assert head_parameters(make(name, foreign_class)) == HEADS[name]


def test_the_trace_leaves_every_train_eval_flag_as_it_was(foreign_class):
    model = make("a", foreign_class).train()
    model.bn1.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    head_parameters(model)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert model.eval() is model and head_parameters(model) and not model.training


def test_the_head_is_traced_once_per_model_and_again_when_its_tensors_change(foreign_class):
    """set_train_mode runs every epoch: it reuses the trace of apply_freezing, also after .to() gave the
    BatchNorms new running-statistics tensors, and traces again once the model holds other tensors."""
    model = make("a", foreign_class)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    apply_freezing(model, True, False)
    model.double()
    for _ in range(3):
        set_train_mode(model, True, False)
    assert len(forwards) == 1
    assert not model.bn3.training and model.bn_fc.training  # the features' BatchNorm frozen, the head's trains
    model.unused = nn.BatchNorm1d(4)
    set_train_mode(model, True, False)
    assert len(forwards) == 2 and not model.unused.training and model.bn_fc.training


@pytest.mark.parametrize("cls, message", [
    (NoConv, r"cannot tell the head of this model \(no convolution"),
    (AllConv, r"cannot tell the head of this model \(no fully connected layer after its last convolution"),
    (SharedGain, r"gain is used both before and after"),
])
def test_a_model_without_a_head_to_find_is_a_user_error_naming_the_pattern_flag(cls, message):
    with pytest.raises(UserError, match=message) as info:
        apply_freezing(cls(), freeze_conv=True, freeze_bn=False)
    assert "--trainable PATTERN" in str(info.value)


# ---------------------------------------------------------------- freezing keeps the frozen tensors exactly

def sgd_steps(model: nn.Module, steps: int = 2) -> None:
    """SGD with momentum on random images in train mode, as set_train_mode leaves the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def batchnorms(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("name", HEADS)
def test_freeze_conv_keeps_every_feature_tensor_bit_identical_and_trains_the_head(name, foreign_class):
    model = make(name, foreign_class)
    model.train()(torch.randn(16, 1, 28, 28))  # BatchNorm statistics that are not the initial ones
    head = HEADS[name]
    apply_freezing(model, True, False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head
    set_train_mode(model, True, False)
    for bn_name, bn in batchnorms(model).items():  # features' BatchNorm in eval mode, the head's training
        assert bn.training == (f"{bn_name}.weight" in head), bn_name
    before = snapshot(model)
    sgd_steps(model)
    after = model.state_dict()
    head_modules = {n.rsplit(".", 1)[0] for n in head if "." in n}
    for key in before:  # parameters and buffers (running statistics, num_batches_tracked)
        in_head = key in head or key.rsplit(".", 1)[0] in head_modules
        if in_head:
            assert not torch.equal(before[key], after[key]), f"{key} did not train"
        else:
            assert torch.equal(before[key], after[key]), f"{key} moved"


def test_freeze_bn_freezes_batchnorm1d_too(foreign_class):
    model = make("a", foreign_class)
    apply_freezing(model, False, True)
    set_train_mode(model, False, True)
    assert all(not bn.training for bn in batchnorms(model).values())
    assert {m for m in frozen_modules(model, False, True)} == set(batchnorms(model).values())
    before = snapshot(model)
    sgd_steps(model)
    after = model.state_dict()
    for key in before:
        if key.startswith(("bn1.", "bn2.", "bn3.", "bn_fc.")):
            assert torch.equal(before[key], after[key]), key
        else:
            assert not torch.equal(before[key], after[key]), key


def test_freeze_conv_and_freeze_bn_together(foreign_class):
    model = make("a", foreign_class)
    apply_freezing(model, True, True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == params_of("fc1", "fc2")


def test_a_functional_model_keeps_its_own_train_flag():
    """The model itself holds the frozen conv weight: it is frozen, but model.train() still holds (a forward
    that reads self.training, for dropout, must not be switched to eval by freezing a weight)."""
    model = FunctionalConv()
    apply_freezing(model, True, False)
    set_train_mode(model, True, False)
    assert not model.w.requires_grad and model.fc.weight.requires_grad and model.training
    assert frozen_modules(model, True, False) == [model]


# ---------------------------------------------------------------- --trainable patterns

@pytest.mark.parametrize("name, patterns, trainable", [
    ("a", ["fc*", "bn_fc"], params_of("fc1", "bn_fc", "fc2")),
    ("a", ["fc2"], params_of("fc2")),
    ("cnn3", ["classifier"], params_of("classifier.2", "classifier.5")),  # a module names what it holds
    ("cnn3", ["features.0", "classifier.5"], {"features.0.weight", *params_of("classifier.5")}),
    ("c", ["head"], params_of("head.2")),
    ("d", ["classifier"], params_of("classifier")),
    ("functional conv", ["w"], {"w"}),  # a parameter of the model itself, by its own name
])
def test_trainable_patterns(name, patterns, trainable, foreign_class):
    model = make(name, foreign_class)
    apply_freezing(model, False, False, patterns)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_trainable_patterns_freeze_batchnorm_statistics_they_do_not_name(foreign_class):
    model = make("a", foreign_class)
    apply_freezing(model, False, False, ["fc*"])
    set_train_mode(model, False, False, ["fc*"])
    assert all(not bn.training for bn in batchnorms(model).values()) and model.training
    before = snapshot(model)
    sgd_steps(model)
    assert torch.equal(before["bn_fc.running_mean"], model.bn_fc.running_mean)
    assert not torch.equal(before["fc1.weight"], model.fc1.weight)


@pytest.mark.parametrize("pattern", ["head*", "["])
def test_a_pattern_matching_nothing_is_a_usage_error_listing_the_layers(foreign_class, pattern):
    with pytest.raises(UsageError, match=re.escape(f"--trainable {pattern!r} matches no layer of this model; its "
                                                   "layers are: conv1, bn1, ") + ".*fc1, bn_fc, dropout, fc2") as info:
        apply_freezing(make("a", foreign_class), False, False, ["fc*", pattern])
    assert info.value.exit_code == 2


def test_freeze_bn_on_a_model_without_batchnorm_says_it_changes_nothing():
    with pytest.warns(UserWarning, match="^this model has no BatchNorm layer, so --freeze-bn changes nothing$"):
        apply_freezing(FunctionalConv(), freeze_conv=False, freeze_bn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_freezing(FunctionalConv(), freeze_conv=False, freeze_bn=False)
        apply_freezing(build_model("cnn3"), freeze_conv=False, freeze_bn=True)


# ---------------------------------------------------------------- the summary line

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


# ---------------------------------------------------------------- no batch of one through a BatchNorm1d

def train_step(model: nn.Module) -> TrainStep:
    cfg = Config()
    optimizer = build_optimizer(model, cfg, 1e-3)
    return TrainStep(model, optimizer, build_schedulers(optimizer, cfg, 1), torch.amp.GradScaler("cpu", enabled=False),
                     0.0, None)


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_a_training_batch_of_one_image_never_reaches_a_batchnorm1d(freeze_bn, foreign_class):
    model = make("a", foreign_class)
    apply_freezing(model, False, freeze_bn)
    set_train_mode(model, False, freeze_bn)
    step = train_step(model)
    rt = ComputeSettings(torch.device("cpu"), AmpPolicy(None, False), 0.0, 1.0)
    x, y = torch.randn(1, 1, 28, 28), torch.tensor([3])
    if freeze_bn:  # BatchNorm1d in eval mode uses its running statistics: one image is fine
        step(x, y, rt)
    else:
        before = snapshot(model)
        with pytest.raises(UserError, match=r"batch of one image cannot train BatchNorm1d bn_fc .*--batch-size 2"):
            step(x, y, rt)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    step(torch.randn(2, 1, 28, 28), torch.tensor([3, 4]), rt)  # two images always train
