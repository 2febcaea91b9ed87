"""The CNNs and the arch registry: a name maps to a constructor and its default kwargs.

Checkpoints store `arch` + `arch_kwargs`, so a model is rebuilt from the file alone (as nanoGPT
does with its model args). Our networks are `features` (all that `--freeze-conv` freezes) and a
`classifier` (the head that stays trainable).
"""

import re
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

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
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

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
        if not widths or blocks < 1:
            raise ValueError(f"a ResNet needs at least one width and one block per stage, got {widths}, {blocks}")
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


@dataclass(frozen=True)
class ArchSpec:
    build: Callable[..., nn.Module]
    default_kwargs: dict


ARCHS = {
    "cnn3": ArchSpec(CNN3, {"channels": [48, 96, 192], "hidden": 384, "dropout": 0.3, "num_classes": NUM_CLASSES}),
    "resnet": ArchSpec(ResNet, {"widths": [16, 32, 64], "blocks": 3, "num_classes": NUM_CLASSES}),
}


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# What a kwarg must be, by the type of its registry default: (test, what the message says it must be)
KWARG_RULES = {
    list: (lambda v: isinstance(v, list) and bool(v) and all(map(_whole, v)), "a non-empty list of whole numbers >= 1"),
    int: (_whole, "a whole number >= 1"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)"),
}


def resolve_arch_kwargs(arch: str, arch_kwargs: dict | None = None) -> dict:
    """The registry defaults overlaid with the given kwargs (lists, so they survive torch.save)."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; known: {', '.join(sorted(ARCHS))}")
    return {**ARCHS[arch].default_kwargs, **(arch_kwargs or {})}


def check_kwarg_types(arch: str, kwargs: dict) -> None:
    """Each kwarg has the shape of its registry default (widths, depth, head size, classes, dropout)."""
    defaults = ARCHS[arch].default_kwargs
    for name, value in kwargs.items():
        if name not in defaults:
            raise UserError(f"unexpected keyword {name!r} for {arch}; it takes {', '.join(defaults)}")
        ok, want = KWARG_RULES[type(defaults[name])]
        if not ok(value):
            raise UserError(f"{name} must be {want}, got {value!r}")


def on_meta(build: Callable[[], nn.Module], max_params: int) -> nn.Module:
    """The model that build() makes, on the meta device: its shapes and size without allocating a byte, so
    that widths recorded in a file or typed in a flag can be refused before they take the memory. A
    UserError says what is wrong."""
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
    """on_meta, and one meta forward: its output's shape. Returns the parameter count."""
    model = on_meta(build, max_params)
    try:
        with torch.device("meta"):
            out = model.eval()(torch.empty(2, *INPUT_SHAPE))
    except Exception as exc:  # a forward that fails fails in any way
        raise UserError(f"the model cannot be run: {type(exc).__name__}: {first_line(exc)}") from None
    _check_scores(out, "the model")
    return sum(p.numel() for p in model.parameters())


def build_model(arch: str, arch_kwargs: dict | None = None) -> nn.Module:
    kwargs = resolve_arch_kwargs(arch, arch_kwargs)
    try:
        return ARCHS[arch].build(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # unknown names, wrong types, zero widths
        raise UserError(f"bad arch_kwargs for {arch!r}: {exc}") from None


def build_source(arch: str, kwargs: dict, model_def: "userdef.ModelDef | None" = None) -> nn.Module:
    """A fresh model of either source: the user's class (model_def) or our registry's arch."""
    return userdef.build(model_def, kwargs) if model_def is not None else build_model(arch, kwargs)


@torch.no_grad()
def check_outputs(model: nn.Module, name: str) -> None:
    """The model must give one score per class (logits or log-probabilities) for each image."""
    was_training = model.training
    try:
        out = model.eval()(torch.zeros(2, *INPUT_SHAPE))
    except Exception as exc:  # the user's forward may fail in any way
        raise UserError(f"{name}: a forward pass of 2 blank images failed: {type(exc).__name__}: "
                        f"{first_line(exc)}") from None
    finally:
        model.train(was_training)
    _check_scores(out, name)
    if (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(2)):
        raise UserError(f"{name} returns probabilities (each row non-negative, summing to 1), and cross-entropy "
                        "on probabilities trains wrongly: return the logits, or log_softmax of them")


def _check_scores(out, name: str) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, NUM_CLASSES):
        got = f"a {type(out).__name__}" if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
        raise UserError(f"{name} gives {got} for 2 images; Fashion-MNIST needs {NUM_CLASSES} scores per image "
                        "(logits or log_softmax)")


# Reading the kwargs of our networks off a bare state_dict. Each size is the majority vote of every tensor
# that carries it, so that one damaged tensor is reported by name instead of hiding the whole architecture.
# The class count is read, not assumed: a head for another class count must be reported as such.

def _most_common(values: list) -> int:
    return Counter(v for v in values if v is not None).most_common(1)[0][0]


def _bias(weight_key: str) -> str:
    return weight_key.removesuffix("weight") + "bias"


def _cnn3_kwargs_from_shapes(shapes: dict) -> dict | None:
    """Channel widths, head size and class count of a cnn3 (conv out, BatchNorm, next conv in, head), or None."""
    convs = [k for k in shapes if re.fullmatch(r"features\.\d+\.weight", k) and len(shapes[k]) == 4]
    linears = [k for k in shapes if re.fullmatch(r"classifier\.\d+\.weight", k) and len(shapes[k]) == 2]
    if len(convs) != 3 or len(linears) != 2:
        return None
    layer = {k: int(k.split(".")[1]) for k in convs + linears}
    convs.sort(key=layer.get)
    first, last = sorted(linears, key=layer.get)

    def dim(key, axis):
        shape = shapes.get(key)
        return shape[axis] if shape is not None and len(shape) > axis else None

    channels = []
    for conv, next_conv in zip(convs, [*convs[1:], None]):
        bn = f"features.{layer[conv] + 1}."
        bn_dims = [dim(bn + name, 0) for name in ("weight", "bias", "running_mean", "running_var")]
        channels.append(_most_common([dim(conv, 0), *bn_dims, dim(next_conv, 1)]))
    hidden = _most_common([dim(first, 0), dim(_bias(first), 0), dim(last, 1)])
    num_classes = _most_common([dim(last, 0), dim(_bias(last), 0)])
    return {"channels": channels, "hidden": hidden, "num_classes": num_classes}


def _resnet_kwargs_from_shapes(shapes: dict) -> dict | None:
    """Widths (a stage's convs and BatchNorms, the stem's for the first), blocks per stage (the majority
    over the stages) and class count of a ResNet, or None."""
    stages: dict[int, list[str]] = {}
    for key in shapes:
        if match := re.match(r"features\.stage(\d+)\.", key):
            stages.setdefault(int(match[1]), []).append(key)
    stem = [k for k in shapes if k.startswith("features.stem.")]
    head = [k for k in shapes if k.startswith("classifier.") and k.endswith(".weight") and len(shapes[k]) == 2]
    if not stem or not stages or sorted(stages) != list(range(1, len(stages) + 1)) or not head:
        return None

    def out_channels(keys):  # dim 0 of conv weights and BatchNorm vectors; num_batches_tracked has none
        return [shapes[k][0] for k in keys if len(shapes[k]) in (1, 4)]

    widths = [_most_common(out_channels(stages[i] + (stem if i == 1 else []))) for i in sorted(stages)]
    blocks = _most_common([len({k.split(".")[2] for k in keys}) for keys in stages.values()])
    bias = _bias(head[-1])
    num_classes = _most_common([shapes[head[-1]][0], *out_channels([bias] if bias in shapes else [])])
    return {"widths": widths, "blocks": blocks, "num_classes": num_classes}


KWARGS_FROM_SHAPES = {"cnn3": _cnn3_kwargs_from_shapes, "resnet": _resnet_kwargs_from_shapes}


def shape_mismatches(model: nn.Module, state_dict: dict) -> list[str]:
    """Human-readable differences between a model's state_dict and a loaded one (empty: they match)."""
    expected = model.state_dict()

    def shown(keys, tensors):
        return ", ".join(f"{k} {tuple(tensors[k].shape)}" for k in keys[:4]) + (" ..." if len(keys) > 4 else "")

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = [f"{what} keys: {shown(keys, tensors)}"
                for what, keys, tensors in [("missing", missing, expected), ("unexpected", unexpected, state_dict)]
                if keys]
    return problems + [
        f"{key} has shape {tuple(state_dict[key].shape)}, expected {tuple(tensor.shape)}"
        if tuple(state_dict[key].shape) != tuple(tensor.shape) else
        f"{key} holds {state_dict[key].dtype} values, expected {_kind(tensor)} ({tensor.dtype})"
        for key, tensor in expected.items()
        if key in state_dict and (tuple(state_dict[key].shape), _kind(state_dict[key])) != (tuple(tensor.shape), _kind(tensor))]


def _kind(tensor: torch.Tensor) -> str:
    """What load_state_dict would cast silently between: floating-point, complex, integer, bool."""
    if tensor.is_complex() or tensor.is_floating_point():
        return "complex" if tensor.is_complex() else "floating-point"
    return "bool" if tensor.dtype == torch.bool else "integer"


def infer_arch(state_dict: dict) -> tuple[str, dict]:
    """Match a bare state_dict against the registry by keys and shapes."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    for arch, kwargs_from_shapes in KWARGS_FROM_SHAPES.items():
        kwargs = kwargs_from_shapes(shapes)
        if kwargs is None:
            continue
        try:
            with torch.device("meta"):  # the shapes alone: nothing allocated
                model = build_model(arch, kwargs)
        except UserError:
            continue
        problems = shape_mismatches(model, state_dict)
        if not problems:
            return arch, resolve_arch_kwargs(arch, kwargs)
        if len(problems) <= 2:  # the right family with a damaged tensor: say which one
            raise UserError(f"checkpoint looks like {arch} but does not match it: {'; '.join(problems)}")
    sample = ", ".join(list(shapes)[:3])
    raise UserError(f"checkpoint matches no known architecture ({', '.join(sorted(ARCHS))}); its first keys: {sample}; "
                    "if it is your own network, pass --model-def FILE.py:CLASS (and --normalize MEAN STD)")


def output_classes(model: nn.Module) -> tuple[int, str]:
    """(number of classes the model predicts, the state_dict key that sets it): the last Linear layer
    is the head; a model without one is asked with a forward pass."""
    heads = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if heads:
        name, head = heads[-1]
        return head.out_features, f"{name}.weight"
    with torch.no_grad():
        return model.eval()(torch.zeros(1, *INPUT_SHAPE)).shape[-1], "the model's output"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / torch.compile wrappers, so that checkpoints load anywhere."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)
