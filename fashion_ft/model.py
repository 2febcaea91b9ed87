"""The CNNs and the arch registry: a name maps to a constructor and its default kwargs.

Checkpoints store `arch` + `arch_kwargs`, so a model is rebuilt from the file alone (as nanoGPT
does with its model args). Each network ends in a `classifier`, which is the head that --freeze-conv
finds by tracing (freezing.py) and leaves trainable.
"""

import re
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from . import userdef
from .errors import UserError, first_line

NUM_CLASSES = 10
INPUT_SHAPE = (1, 28, 28)
USER_ARCH = "user"  # the arch of a checkpoint whose model_def names the user's own class


class CNN3(nn.Module):
    """Three conv blocks (conv -> BatchNorm -> ReLU -> 2x2 max-pool), then an MLP head with dropout."""

    def __init__(self, channels=(48, 96, 192), hidden=384, dropout=0.3, num_classes=NUM_CLASSES):
        super().__init__()
        blocks, in_ch = [], INPUT_SHAPE[0]
        for out_ch in channels:
            blocks += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        side = INPUT_SHAPE[1] // 2 ** len(channels)  # 28 -> 14 -> 7 -> 3
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_ch * side * side, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, ReLU after the add (He et al. 2016). The shortcut is
    a 1x1 conv + BN wherever the shape changes ("option B"), else the identity."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                                      nn.BatchNorm2d(out_ch)) if stride != 1 or in_ch != out_ch else nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 for 1x28x28 input: a 3x3 stem, one stage of `blocks` BasicBlocks
    per width (each stage after the first halves the side: 28 -> 14 -> 7), global average pooling, a
    linear head. The defaults are ResNet-20 (6 * blocks + 2 layers). Stages are named `stage1`,
    `stage2`, ... so that a bare state_dict tells its widths and depth.
    """

    def __init__(self, widths=(16, 32, 64), blocks=3, num_classes=NUM_CLASSES):
        super().__init__()
        layers = OrderedDict(stem=nn.Sequential(
            nn.Conv2d(INPUT_SHAPE[0], widths[0], kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True)))
        in_ch = widths[0]
        for i, out_ch in enumerate(widths):
            layers[f"stage{i + 1}"] = nn.Sequential(
                BasicBlock(in_ch, out_ch, 1 if i == 0 else 2), *(BasicBlock(out_ch, out_ch) for _ in range(blocks - 1))
            )
            in_ch = out_ch
        layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())
        self.features = nn.Sequential(layers)
        self.classifier = nn.Sequential(nn.Linear(in_ch, num_classes))
        # torchvision's ResNet init; the last BN of each branch keeps gamma 1 (zero-init not measured here)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        return self.classifier(self.features(x))


class ArchSpec(NamedTuple):
    build: Callable[..., nn.Module]
    default_kwargs: dict  # lists, not tuples, so that they survive torch.save(weights_only=True)


ARCHS = {
    "cnn3": ArchSpec(CNN3, {"channels": [48, 96, 192], "hidden": 384, "dropout": 0.3, "num_classes": NUM_CLASSES}),
    "resnet": ArchSpec(ResNet, {"widths": [16, 32, 64], "blocks": 3, "num_classes": NUM_CLASSES}),
}


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


WIDTHS = (lambda v: isinstance(v, list) and bool(v) and all(map(_whole, v)), "a non-empty list of whole numbers >= 1")
WHOLE = (_whole, "a whole number >= 1")
# What each kwarg of our networks must be, as config.LIMITS: field -> (test, what it must be)
KWARG_RULES = {
    "channels": WIDTHS, "widths": WIDTHS, "hidden": WHOLE, "blocks": WHOLE, "num_classes": WHOLE,
    "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)"),
}


def resolve_arch_kwargs(arch: str, arch_kwargs: dict | None = None) -> dict:
    """The registry defaults overlaid with the given kwargs."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; known: {', '.join(sorted(ARCHS))}")
    return {**ARCHS[arch].default_kwargs, **(arch_kwargs or {})}


def check_kwarg_types(arch: str, kwargs: dict) -> None:
    """Each kwarg is one the arch takes, and what KWARG_RULES says it must be."""
    for name, value in kwargs.items():
        if name not in ARCHS[arch].default_kwargs:
            raise UserError(f"unexpected keyword {name!r} for {arch}; it takes {', '.join(ARCHS[arch].default_kwargs)}")
        ok, want = KWARG_RULES[name]
        if not ok(value):
            raise UserError(f"{name} must be {want}, got {value!r}")


def build_model(arch: str, arch_kwargs: dict | None = None) -> nn.Module:
    """One of our networks; kwargs from a flag or a file are checked here, before its constructor sees them."""
    kwargs = resolve_arch_kwargs(arch, arch_kwargs)
    check_kwarg_types(arch, kwargs)
    return ARCHS[arch].build(**kwargs)


def build_source(arch: str, kwargs: dict, model_def: "userdef.ModelDef | None" = None) -> nn.Module:
    """A fresh model of either source: the user's class (model_def) or our registry's arch."""
    return userdef.build(model_def, kwargs) if model_def is not None else build_model(arch, kwargs)


def on_meta(build: Callable[[], nn.Module], max_params: int) -> nn.Module:
    """The model that build() makes, on the meta device: its shapes and size without allocating a byte, so
    that widths recorded in a file or typed in a flag are refused before they take the memory."""
    try:
        with torch.device("meta"):
            model = build()
    except UserError:
        raise
    except Exception as exc:  # a constructor fails in any way
        raise UserError(f"the model cannot be built: {type(exc).__name__}: {first_line(exc)}") from None
    params = sum(p.numel() for p in model.parameters())
    if params > max_params:
        raise UserError(f"the model would have {params:,} parameters ({params * 4 / 2**20:,.0f} MiB per best "
                        f"model, about 4x that for last.pt with AdamW); the limit is {max_params:,} (--max-params)")
    return model


def check_architecture(build: Callable[[], nn.Module], max_params: int) -> int:
    """on_meta, and its scores for 2 images, still on the meta device. Returns the parameter count."""
    model = on_meta(build, max_params)
    _scores(model, "the model", "meta")
    return sum(p.numel() for p in model.parameters())


def check_outputs(model: nn.Module, name: str) -> None:
    """The model must give one score per class (logits or log-probabilities) for each image."""
    out = _scores(model, name)
    if (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(2)):
        raise UserError(f"{name} returns probabilities (each row non-negative, summing to 1), and cross-entropy "
                        "on probabilities trains wrongly: return the logits, or log_softmax of them")


@torch.no_grad()
def _scores(model: nn.Module, name: str, device=None) -> torch.Tensor:
    """The eval-mode output for 2 blank images, of shape (2, NUM_CLASSES); the model's mode is put back."""
    was_training = model.training
    try:
        out = model.eval()(torch.zeros(2, *INPUT_SHAPE, device=device))
    except Exception as exc:  # the user's forward may fail in any way
        raise UserError(f"{name}: a forward pass of 2 blank images failed: {type(exc).__name__}: "
                        f"{first_line(exc)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, NUM_CLASSES):
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise UserError(f"{name} gives {got} for 2 images; Fashion-MNIST needs {NUM_CLASSES} scores per image "
                        "(logits or log_softmax)")
    return out


# Reading the kwargs of our networks off a bare state_dict. Each size is the majority vote of every tensor
# that carries it, so that one damaged tensor is named instead of hiding the whole architecture. The class
# count is read, not assumed: a head for another class count must be reported as such. A size that no
# tensor carries is None, which build_model refuses: not this family.

def _most_common(values: list) -> int | None:
    return Counter(values).most_common(1)[0][0] if values else None


def _vote(shapes: dict, places) -> int | None:
    """The size that most of `places` ((key, axis)) agree on."""
    return _most_common([shapes[k][axis] for k, axis in places if k in shapes and len(shapes[k]) > axis])


def _cnn3_kwargs(shapes: dict) -> dict:
    """Each width from its conv, its BatchNorm and the next conv; the head's sizes from both linears."""
    bn = ("weight", "bias", "running_mean", "running_var")
    channels = [_vote(shapes, [(f"features.{i}.weight", 0), (f"features.{i + 4}.weight", 1),
                               *((f"features.{i + 1}.{name}", 0) for name in bn)]) for i in (0, 4, 8)]
    hidden = _vote(shapes, [("classifier.2.weight", 0), ("classifier.2.bias", 0), ("classifier.5.weight", 1)])
    num_classes = _vote(shapes, [("classifier.5.weight", 0), ("classifier.5.bias", 0)])
    return {"channels": channels, "hidden": hidden, "num_classes": num_classes}


def _resnet_kwargs(shapes: dict) -> dict:
    """Each width from the output sizes of its stage's convs and BatchNorms (the stem's with the first), the
    blocks per stage (the majority over the stages), the class count from the head."""
    stages: dict[int, dict] = {}  # stage -> block (None: the stem) -> output sizes
    for key, shape in shapes.items():
        if (match := re.match(r"features\.(?:stage(\d+)\.(\d+)|stem)\.", key)) and len(shape) in (1, 4):
            stages.setdefault(int(match[1] or 1), {}).setdefault(match[2], []).append(shape[0])
    widths = [_most_common([n for sizes in stages[s].values() for n in sizes]) for s in sorted(stages)]
    blocks = _most_common([len(set(stage) - {None}) for stage in stages.values()])
    num_classes = _vote(shapes, [("classifier.0.weight", 0), ("classifier.0.bias", 0)])
    return {"widths": widths, "blocks": blocks, "num_classes": num_classes}


def infer_arch(state_dict: dict) -> tuple[str, dict]:
    """Match a bare state_dict against the registry by keys and shapes."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    for arch, kwargs_from_shapes in (("cnn3", _cnn3_kwargs), ("resnet", _resnet_kwargs)):
        kwargs = kwargs_from_shapes(shapes)
        try:
            with torch.device("meta"):  # the shapes alone: nothing allocated
                problems = shape_mismatches(build_model(arch, kwargs), state_dict)
        except UserError:  # sizes that no network of this family has
            continue
        if not problems:
            return arch, resolve_arch_kwargs(arch, kwargs)
        if len(problems) <= 2:  # the right family with a damaged tensor: say which one
            raise UserError(f"checkpoint looks like {arch} but does not match it: {'; '.join(problems)}")
    raise UserError(f"checkpoint matches no known architecture ({', '.join(sorted(ARCHS))}); its first keys: "
                    f"{', '.join(list(shapes)[:3])}; if it is your own network, pass --model-def FILE.py:CLASS "
                    "(and --normalize MEAN STD)")


def shape_mismatches(model: nn.Module, state_dict: dict) -> list[str]:
    """Human-readable differences between a model's state_dict and a loaded one (empty: they match)."""
    expected = model.state_dict()

    def listed(what: str, keys: list, tensors: dict) -> list[str]:
        shown = ", ".join(f"{k} {tuple(tensors[k].shape)}" for k in keys[:4]) + (" ..." if len(keys) > 4 else "")
        return [f"{what} keys: {shown}"] if keys else []

    problems = (listed("missing", [k for k in expected if k not in state_dict], expected)
                + listed("unexpected", [k for k in state_dict if k not in expected], state_dict))
    for key, want in expected.items():
        got = state_dict.get(key)
        if got is not None and got.shape != want.shape:
            problems.append(f"{key} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got is not None and _kind(got) != _kind(want):
            problems.append(f"{key} holds {got.dtype} values, expected {_kind(want)} ({want.dtype})")
    return problems


def _kind(t: torch.Tensor) -> str:
    """What load_state_dict would cast silently between."""
    return ("complex" if t.is_complex() else "floating-point" if t.is_floating_point() else
            "bool" if t.dtype == torch.bool else "integer")


def output_classes(model: nn.Module) -> tuple[int, str]:
    """(number of classes one of our networks predicts, the state_dict key that sets it): its last Linear."""
    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return head.out_features, f"{name}.weight"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / torch.compile wrappers, so that checkpoints load anywhere."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)
