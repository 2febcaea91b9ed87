"""The models: a user's own class (--model-def), our CNNs and their registry (arch name -> constructor and default
kwargs: checkpoints store `arch` + `arch_kwargs`, as nanoGPT does its model args, so a file alone rebuilds its
model), and freezing (--freeze-conv, which finds the head by tracing, --freeze-bn, --trainable)."""

import fnmatch
import hashlib
import importlib.util
import io
import re
import shlex
import sys
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import UsageError, UserError, first_line, printable

# ---------------------------------------------------------------- a user's own network class (--model-def)

@dataclass(frozen=True)
class ModelDef:
    given: str  # FILE.py or pkg.mod, as the user wrote it
    cls: str
    resolved: str | None = None  # the file's absolute path; None: a dotted module
    sha256: str | None = None  # of the file's bytes when it was recorded

    def to_dict(self) -> dict:
        return {"given": self.given, "resolved": self.resolved, "class": self.cls, "sha256": self.sha256}


def parse(text: str) -> ModelDef:
    """'path/to/mnist-gpu.py:Net' or 'pkg.mod:Net' -> ModelDef; a UsageError names what is wrong."""
    target, sep, cls = text.rpartition(":")
    if not sep or not target or not cls.isidentifier():
        raise UsageError(f"--model-def {text!r}: expected FILE.py:CLASS or package.module:CLASS, e.g. "
                         "--model-def mnist-gpu.py:Net")
    if not (target.endswith(".py") or "/" in target):
        return ModelDef(target, cls)
    path = Path(target).expanduser()
    if not path.is_file():
        raise UsageError(f"--model-def {text}: {target} " + ("is not a file" if path.exists() else "not found"))
    return ModelDef(target, cls, str(path.resolve()), file_sha256(path))


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def refusal(record: dict, where: str) -> UserError:
    """Why checkpoint `where`, which records a user's class (ModelDef.to_dict()), is not built without it."""
    flag = printable(shlex.quote(f"{record.get('resolved') or record['given']}:{record['class']}"))
    return UserError(f"{where}: its model is your class {printable(str(record['class']))}, and a checkpoint never "
                     f"chooses code to run; if you trust the file, pass --model-def {flag}")


def _import(definition: ModelDef):
    """The user's module, imported once per process as their script would be (their folder on sys.path), but with
    no __main__ block, no bytecode written by it, no reading of our argv or stdin; its stderr is passed on only
    after a success, so that a failure (argparse's usage text) stays one line."""
    where, name = definition.given, None
    path = Path(definition.resolved or Path.cwd() / "_")
    saved, held = (sys.argv, sys.dont_write_bytecode, list(sys.path), sys.stdin), io.StringIO()
    try:
        with redirect_stderr(held):
            sys.argv, sys.dont_write_bytecode, sys.stdin = [str(path)], True, io.StringIO()
            sys.path.insert(0, str(path.parent))
            if definition.resolved is None:
                module = importlib.import_module(where)
            else:
                name = f"fashion_ft_user_{(definition.sha256 or '')[:16]}_{path.stem.replace('-', '_')}"
                if name not in sys.modules:
                    spec = importlib.util.spec_from_file_location(name, path)
                    # in sys.modules before it runs: dataclasses and pickling look their module up meanwhile
                    sys.modules[name] = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(sys.modules[name])
                module = sys.modules[name]
    except (Exception, SystemExit) as exc:  # the user's code may fail in any way; a half-run module is not kept
        sys.modules.pop(name, None)
        if isinstance(exc, SystemExit):
            said = (held.getvalue().strip().splitlines() or [f"code {exc.code}"])[-1]
            raise UserError(f"{where}: importing it exited ({said}): a top-level parse_args() or sys.exit()? move "
                            "it under if __name__ == \"__main__\":") from None
        if isinstance(exc, SyntaxError):
            raise UserError(f"{exc.filename or where}:{exc.lineno}: syntax error: {exc.msg}") from None
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            raise UserError(f"{where} imports {exc.name}, which this Python does not have: install it with "
                            f"{shlex.quote(sys.executable)} -m pip install {exc.name.partition('.')[0]} (the "
                            "package may have another name), or move the class to a file importing only what it "
                            "needs") from None
        raise UserError(f"{where}: importing it failed: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        sys.argv, sys.dont_write_bytecode, sys.path[:], sys.stdin = saved
    sys.stderr.write(held.getvalue())
    return module


def build(definition: ModelDef, kwargs: dict) -> nn.Module:
    """An instance of the user's class with `kwargs`; every failure is one UserError line."""
    named = f"{definition.given}:{definition.cls}"
    cls = getattr(_import(definition), definition.cls, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UserError(f"{definition.given} has no class {definition.cls}" if cls is None else
                        f"{named} is not an nn.Module subclass (it is a {type(cls).__name__})")
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise UserError(f"{named}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
                        f"{type(exc).__name__}: {first_line(exc)}") from None


NUM_CLASSES = 10
INPUT_SHAPE = (1, 28, 28)
USER_ARCH = "user"  # the arch of a checkpoint whose model_def names the user's own class


class CNN3(nn.Sequential):
    """`features`: three conv blocks (conv -> BatchNorm -> ReLU -> 2x2 max-pool); `classifier`: an MLP with dropout."""

    def __init__(self, channels=(48, 96, 192), hidden=384, dropout=0.3, num_classes=NUM_CLASSES):
        blocks = []
        for in_ch, out_ch in zip([INPUT_SHAPE[0], *channels], channels):
            blocks += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        side = INPUT_SHAPE[1] // 2 ** len(channels)  # 28 -> 14 -> 7 -> 3
        super().__init__(OrderedDict(features=nn.Sequential(*blocks), classifier=nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels[-1] * side * side, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes))))


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


class ResNet(nn.Sequential):
    """The CIFAR ResNet of He et al. 2016 for 1x28x28 input: a 3x3 stem, a stage of `blocks` BasicBlocks per
    width (each after the first halves the side: 28 -> 14 -> 7), global average pooling (`features`), a linear
    `classifier`; the defaults are ResNet-20 (6 * blocks + 2 layers). Named stages: a bare state_dict tells
    widths and depth."""

    def __init__(self, widths=(16, 32, 64), blocks=3, num_classes=NUM_CLASSES):
        layers = OrderedDict(stem=nn.Sequential(
            nn.Conv2d(INPUT_SHAPE[0], widths[0], kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True)))
        for i, (in_ch, out_ch) in enumerate(zip([widths[0], *widths], widths)):
            layers[f"stage{i + 1}"] = nn.Sequential(BasicBlock(in_ch, out_ch, 1 if i == 0 else 2),
                                                    *(BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)))
        layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())
        super().__init__(OrderedDict(features=nn.Sequential(layers),
                                     classifier=nn.Sequential(nn.Linear(widths[-1], num_classes))))
        # torchvision's ResNet init (BatchNorm's own is already gamma 1, beta 0); the last BN of each branch
        # keeps gamma 1 (zero-init not measured here)
        for conv in (m for m in self.modules() if isinstance(m, nn.Conv2d)):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


class ArchSpec(NamedTuple):
    build: Callable[..., nn.Module]
    default_kwargs: dict  # lists, not tuples, so that they survive torch.save(weights_only=True)


ARCHS = {
    "cnn3": ArchSpec(CNN3, {"channels": [48, 96, 192], "hidden": 384, "dropout": 0.3, "num_classes": NUM_CLASSES}),
    "resnet": ArchSpec(ResNet, {"widths": [16, 32, 64], "blocks": 3, "num_classes": NUM_CLASSES}),
}


WHOLE = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1")
WIDTHS = (lambda v: isinstance(v, list) and bool(v) and all(map(WHOLE[0], v)), "a non-empty list of whole numbers >= 1")
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


def build_model(arch: str, arch_kwargs: dict | None = None) -> nn.Module:
    """One of our networks; kwargs from a flag or a file are checked here, before its constructor sees them."""
    kwargs = resolve_arch_kwargs(arch, arch_kwargs)
    for name, value in kwargs.items():
        if name not in ARCHS[arch].default_kwargs:
            raise UserError(f"unexpected keyword {name!r} for {arch}; it takes {', '.join(ARCHS[arch].default_kwargs)}")
        ok, want = KWARG_RULES[name]
        if not ok(value):
            raise UserError(f"{name} must be {want}, got {value!r}")
    return ARCHS[arch].build(**kwargs)


def build_source(arch: str, kwargs: dict, model_def: "ModelDef | None" = None) -> nn.Module:
    """A fresh model of either source: the user's class (model_def) or our registry's arch."""
    return build(model_def, kwargs) if model_def is not None else build_model(arch, kwargs)


def on_meta(build: Callable[[], nn.Module], max_params: int) -> nn.Module:
    """build()'s model on the meta device: widths from a file or a flag are refused before they take memory."""
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


def check_architecture(build: Callable[[], nn.Module], max_params: int) -> None:
    """on_meta, and its scores for 2 images, still on the meta device."""
    check_outputs(on_meta(build, max_params), "the model", "meta")


@torch.no_grad()
def check_outputs(model: nn.Module, name: str, device=None) -> None:
    """The eval-mode output for 2 blank images must be one score per class for each, logits or log-probabilities
    (meta tensors hold no values to tell probabilities by); the model's mode is put back."""
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
    if device != "meta" and (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(2)):
        raise UserError(f"{name} returns probabilities (each row non-negative, summing to 1), and cross-entropy "
                        "on probabilities trains wrongly: return the logits, or log_softmax of them")


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
    """Each width from the output sizes of its stage's convs and BatchNorms (the stem's with the first's)."""
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
    odd = {"missing": ([k for k in expected if k not in state_dict], expected),
           "unexpected": ([k for k in state_dict if k not in expected], state_dict)}
    problems = [f"{what} keys: " + ", ".join(f"{k} {tuple(tensors[k].shape)}" for k in keys[:4])
                + (" ..." if len(keys) > 4 else "") for what, (keys, tensors) in odd.items() if keys]
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


# ---------------------------------------------------------------- freezing (--freeze-conv, --freeze-bn, --trainable)

FC_OPS = frozenset({"linear", "addmm", "matmul", "mm"})  # the last three count only with a 2-D parameter
PATTERN_HINT = "name the trainable layers with --trainable PATTERN"
# The model attribute that names the modules holding frozen buffers (names, not tensors, survive .to(device)
# and SyncBatchNorm's conversion), which set_train_mode keeps in eval mode every epoch
FROZEN_ATTR = "_fashion_ft_frozen_modules"


def _tensors(tree) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and dicts (a torch function's args and kwargs)."""
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class _OpRecorder(torch.overrides.TorchFunctionMode):
    """Records, in call order, each torch function (module or functional) given an activation and some of the
    model's tensors: (its name, the ids of those tensors, whether one is a matrix). A tensor computed from
    model tensors alone (w.t(), a weight norm) stands for them in later calls."""

    def __init__(self, ids: set[int]):
        super().__init__()
        self.stands_for = {i: {i} for i in ids}  # tensor id -> the model tensors it is or was computed from
        self.kept: list[torch.Tensor] = []  # the tensors computed here, alive so that their ids are not reused
        self.ops: list[tuple[str, set[int], bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _tensors((args, kwargs))
        model_tensors = [t for t in inputs if id(t) in self.stands_for]
        used = set().union(*(self.stands_for[id(t)] for t in model_tensors))
        if used and len(model_tensors) < len(inputs):
            self.ops.append((getattr(func, "__name__", str(func)), used, any(t.dim() == 2 for t in model_tensors)))
        elif used:
            self.kept += _tensors(out)
            self.stands_for.update({id(t): used for t in _tensors(out)})
        return out


def _head_tensors(model: nn.Module) -> set[int]:
    """ids of the head's tensors: those the ops use from the first fully connected one after the last convolution,
    in one eval forward of 2 zero images (every train/eval flag put back); a UserError when that is no head."""
    names = {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}  # tied: first name
    like = next(model.parameters(), torch.zeros(()))
    flags = [(m, m.training) for m in model.modules()]
    recorder = _OpRecorder(set(names))
    try:
        with torch.no_grad(), recorder:
            model.eval()(torch.zeros(2, *INPUT_SHAPE, device=like.device, dtype=like.dtype))
    except Exception as exc:
        raise UserError(f"cannot tell the head of this model (its forward on 2 zero images failed: "
                        f"{type(exc).__name__}: {first_line(exc)}); {PATTERN_HINT}") from None
    finally:
        for module, training in flags:
            module.training = training
    ops = recorder.ops
    convs = [i for i, (op, _, _) in enumerate(ops) if op.lstrip("_").startswith("conv")]  # conv2d, _convolution, ...
    start = next((i for i, (op, _, matrix) in enumerate(ops)
                  if convs and i > convs[-1] and (op == "linear" or (op in FC_OPS and matrix))), None)
    if start is None:
        why = "no fully connected layer after its last convolution" if convs else "no convolution in its forward"
        raise UserError(f"cannot tell the head of this model ({why}); {PATTERN_HINT}")
    features = set().union(*(used for _, used, _ in ops[:start]))
    head = set().union(*(used for _, used, _ in ops[start:]))
    if shared := sorted(names[i] for i in features & head):
        raise UserError(f"cannot tell the head of this model: {', '.join(shared)} used both before and after its "
                        f"first fully connected layer after the convolutions; {PATTERN_HINT}")
    for module in model.modules():  # a tensor the trace did not see (num_batches_tracked) goes with its module's
        own = {id(t) for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]}
        if own & head:
            head |= own - features
    return head


def _trainable_tensors(model: nn.Module, patterns: list[str]) -> set[int]:
    """ids of the tensors of each module a pattern names, with its children ("classifier" names classifier.2), or
    of a tensor of the model itself; a pattern that names nothing is a UsageError listing the names there are."""
    layers = {name: [*m.parameters(), *m.buffers()] for name, m in model.named_modules() if name}
    layers.update((name, [t]) for name, t in [*model.named_parameters(recurse=False),
                                              *model.named_buffers(recurse=False)])
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            shown = ", ".join(list(layers)[:24]) + (f", ... ({len(layers)} in all)" if len(layers) > 24 else "")
            raise UsageError(f"--trainable {pattern!r} matches no layer of this model; its layers are: {shown}")
    return {id(t) for name, tensors in layers.items() if any(fnmatch.fnmatchcase(name, p) for p in patterns)
            for t in tensors}


def apply_freezing(model: nn.Module, freeze_conv: bool, freeze_bn: bool, trainable=None) -> None:
    """Keeps tensors exactly as loaded: with freeze_conv every one outside the head, with freeze_bn every
    BatchNorm's (1d/2d/3d, SyncBatchNorm), with `trainable` every one no pattern names. Their parameters stop
    requiring gradients; their buffers are for set_train_mode."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if freeze_bn and not batchnorms:
        warnings.warn("this model has no BatchNorm layer, so --freeze-bn changes nothing", stacklevel=2)
    everything = {id(t) for t in [*model.parameters(), *model.buffers()]}
    frozen = everything - _head_tensors(model) if freeze_conv else set()
    if freeze_bn:
        frozen |= {id(t) for m in batchnorms for t in [*m.parameters(), *m.buffers()]}
    if trainable:
        frozen |= everything - _trainable_tensors(model, list(trainable))
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    vars(model)[FROZEN_ATTR] = {name for name, m in model.named_modules()
                                if any(id(b) in frozen for b in m.buffers(recurse=False))}


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except that each module holding frozen buffers (BatchNorm's running statistics) stays
    in eval mode, so that they do not move; its children, and dropout, follow model.train()."""
    frozen = vars(model).get(FROZEN_ATTR, set())
    for name, m in model.train().named_modules():
        if name in frozen:
            m.training = False


def trainable_summary(model: nn.Module) -> str:
    """One line: the fewest modules holding every trainable parameter (a module whose parameters all train
    stands for its children) and the counts, e.g. "trainable: fc1, bn_fc, fc2 (4,522 of 6,000 parameters)"."""
    names = []

    def visit(module: nn.Module, prefix: str) -> None:
        params = list(module.parameters())
        if params and all(p.requires_grad for p in params):
            names.append(prefix or "all")
            return
        names.extend(f"{prefix}.{n}" if prefix else n
                     for n, p in module.named_parameters(recurse=False) if p.requires_grad)
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name)

    visit(model, "")
    total, trained = count_parameters(model)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"trainable: {shown or 'nothing'} ({trained:,} of {total:,} parameters)"
