"""Freezing for any CNN: which tensors --freeze-conv, --freeze-bn and --trainable keep as loaded.

What --freeze-conv freezes is found, for any model, from one forward pass: the head is every layer from
the first fully connected layer that runs after the last convolution to the output; the rest (the
convolutions, and a BatchNorm or pooling right after the last of them) are the features.
apply_freezing records which modules hold frozen buffers; set_train_mode keeps those in eval mode.
"""

import fnmatch
import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import UsageError, UserError, first_line
from .model import INPUT_SHAPE, count_parameters

CONV_OPS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                      "convolution", "_convolution"})
FC_OPS = frozenset({"linear", "addmm", "matmul", "mm"})  # the last three count only with a 2-D parameter
PATTERN_HINT = "name the trainable layers with --trainable PATTERN"
# The model attribute that names the modules holding frozen buffers (names, not tensors, survive .to(device)
# and SyncBatchNorm's conversion), which set_train_mode keeps in eval mode every epoch
FROZEN_ATTR = "_fashion_ft_frozen_modules"


def _tensors(tree) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and dicts (a torch function's args and kwargs)."""
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class _OpRecorder(torch.overrides.TorchFunctionMode):
    """Records, in call order, every torch function that reads the model's parameters or buffers (by
    identity), module or functional: (function name, ids of those tensors, whether one is a matrix).
    A tensor computed from parameters alone (w.t(), a weight norm) stands for them in later calls;
    the call computing it is not an op of its own, as it touches no activation."""

    def __init__(self, ids: set[int]):
        super().__init__()
        self.ids = ids
        self.derived: dict[int, tuple[set[int], torch.Tensor]] = {}  # the tensor kept, so its id is not reused
        self.ops: list[tuple[str, set[int], bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        used, matrix, activation = set(), False, False
        for t in _tensors((args, kwargs)):
            if id(t) in self.ids:
                used.add(id(t))
            elif id(t) in self.derived:
                used |= self.derived[id(t)][0]
            else:
                activation = True
                continue
            matrix |= t.dim() == 2
        if used and activation:
            self.ops.append((getattr(func, "__name__", str(func)), used, matrix))
        elif used:
            self.derived.update({id(t): (used, t) for t in _tensors(out)})
        return out


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def _tensor_names(model: nn.Module) -> dict[int, str]:
    """id -> name of every parameter and buffer (a tied tensor under its first name, as named_* give it)."""
    return {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}


def _trace(model: nn.Module, ids: set[int]) -> list[tuple[str, set[int], bool]]:
    """The ops (see _OpRecorder) of one eval forward of 2 zero images on the model's device, under no_grad;
    every train/eval flag is put back as it was."""
    like = next(model.parameters(), torch.zeros(()))
    x = torch.zeros(2, *INPUT_SHAPE, device=like.device, dtype=like.dtype)
    flags = [(m, m.training) for m in model.modules()]
    recorder = _OpRecorder(ids)
    try:
        with torch.no_grad(), recorder:
            model.eval()(x)
    except Exception as exc:
        raise UserError(f"cannot tell the head of this model (its forward on 2 zero images failed: "
                        f"{type(exc).__name__}: {first_line(exc)}); {PATTERN_HINT}") from None
    finally:
        for module, training in flags:
            module.training = training
    return recorder.ops


def _head_tensors(model: nn.Module) -> set[int]:
    """ids of the parameters and buffers of the head (see the top of this file); a UserError when the
    model has no such head or shares a tensor across it."""
    names = _tensor_names(model)
    ops = _trace(model, set(names))
    convs = [i for i, (op, _, _) in enumerate(ops) if op in CONV_OPS]
    start = next((i for i, (op, _, matrix) in enumerate(ops)
                  if convs and i > convs[-1] and (op == "linear" or (op in FC_OPS and matrix))), None)
    if start is None:
        why = "no fully connected layer after its last convolution" if convs else "no convolution in its forward"
        raise UserError(f"cannot tell the head of this model ({why}); {PATTERN_HINT}")
    features = set().union(*(used for _, used, _ in ops[:start]))
    head = set().union(*(used for _, used, _ in ops[start:]))
    shared = sorted(names[i] for i in features & head)
    if shared:
        raise UserError(f"cannot tell the head of this model: {', '.join(shared)} used both before and after its "
                        f"first fully connected layer after the convolutions; {PATTERN_HINT}")
    # a tensor the forward did not pass to a torch function (num_batches_tracked) goes with its module's
    unseen = set(names) - features - head
    for module in model.modules():
        own = {id(t) for t in _own_tensors(module)}
        if own & head:
            head |= own & unseen
    return head


def _trainable_tensors(model: nn.Module, patterns: list[str]) -> set[int]:
    """ids of the tensors of the modules that a pattern names, directly or through an enclosing module
    ("classifier" names classifier.2 too); a tensor of the model itself, outside any module, by its own
    name. A pattern that names nothing is a UsageError listing the names there are."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    layers = [name for name, _ in model.named_modules() if name] + [name for name, _ in tensors if "." not in name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            shown = ", ".join(layers[:24]) + (f", ... ({len(layers)} in all)" if len(layers) > 24 else "")
            raise UsageError(f"--trainable {pattern!r} matches no layer of this model; its layers are: {shown}")

    def named(layer: str) -> bool:  # the layer or an enclosing module
        parts = layer.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:k]), p) for k in range(1, len(parts) + 1) for p in patterns)

    return {id(t) for name, t in tensors if named(name.rpartition(".")[0] or name)}


def apply_freezing(model: nn.Module, freeze_conv: bool, freeze_bn: bool, trainable=None) -> None:
    """Keeps tensors exactly as loaded: with freeze_conv every one outside the head (the features' weights and
    BatchNorm statistics), with freeze_bn every BatchNorm's (1d/2d/3d, SyncBatchNorm), with `trainable` every
    one no pattern names. Their parameters stop requiring gradients; their buffers are for set_train_mode."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if freeze_bn and not batchnorms:
        warnings.warn("this model has no BatchNorm layer, so --freeze-bn changes nothing", stacklevel=2)
    everything = set(_tensor_names(model))
    frozen = everything - _head_tensors(model) if freeze_conv else set()
    if freeze_bn:
        frozen |= {id(t) for m in batchnorms for t in _own_tensors(m)}
    if trainable:
        frozen |= everything - _trainable_tensors(model, list(trainable))
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    vars(model)[FROZEN_ATTR] = {name for name, m in model.named_modules()
                                if any(id(b) in frozen for b in m.buffers(recurse=False))}


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except that every module apply_freezing found holding frozen buffers (BatchNorm's
    running statistics) stays in eval mode, so that they do not move. Only that module's own flag: its
    children, and layers without tensors (dropout), follow model.train()."""
    frozen = vars(model).get(FROZEN_ATTR, set())
    for name, m in model.train().named_modules():
        if name in frozen:
            m.training = False


def trainable_summary(model: nn.Module, limit: int = 8) -> str:
    """One line: the fewest modules that together hold every trainable parameter (a module whose
    parameters are all trainable stands for its children), and the counts, e.g.
    "trainable: fc1, bn_fc, fc2 (4,522 of 6,000 parameters)"."""
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
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"trainable: {shown or 'nothing'} ({trained:,} of {total:,} parameters)"
