"""Freezing for any CNN: which tensors --freeze-conv, --freeze-bn and --trainable keep as loaded.

What --freeze-conv freezes is found, for any model, from one forward pass: the head is every layer from
the first fully connected layer that runs after the last convolution to the output; the rest (the
convolutions, and a BatchNorm or pooling right after the last of them) are the features.
"""

import fnmatch
import itertools
import warnings

import torch
from torch import nn

from .errors import UsageError, UserError, first_line
from .model import INPUT_SHAPE, count_parameters

CONV_OPS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                      "convolution", "_convolution"})
FC_OPS = frozenset({"linear", "addmm", "matmul", "mm"})  # the last three count only with a 2-D parameter
PATTERN_HINT = "name the trainable layers with --trainable PATTERN"
# The model attribute that keeps its traced head (by tensor name, so that it survives .to(device), which
# replaces buffers), as set_train_mode asks for it every epoch
HEAD_ATTR = "_fashion_ft_head"


def _tensors(tree):
    """Every tensor in a nest of tuples, lists and dicts (a torch function's args and kwargs)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple, dict)):
        for item in tree.values() if isinstance(tree, dict) else tree:
            yield from _tensors(item)


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
    """id -> name of every parameter and buffer (a tied tensor under its first name)."""
    names = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(t), name)
    return names


def _trace(model: nn.Module, ids: set[int]) -> list[tuple[str, set[int], bool]]:
    """The ops (see _OpRecorder) of one eval forward of 2 zero images on the model's device, under no_grad;
    every train/eval flag is put back as it was."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    x = torch.zeros(2, *INPUT_SHAPE, device=first.device if first is not None else None,
                    dtype=first.dtype if first is not None and first.is_floating_point() else None)
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
    """ids of the parameters and buffers of the head (see the top of this file), traced once per model; a
    UserError when the model has no such head or shares a tensor across it."""
    names = _tensor_names(model)
    structure = tuple(names.values())
    cached = vars(model).get(HEAD_ATTR)
    if cached is not None and cached[0] == structure:
        return {i for i, name in names.items() if name in cached[1]}
    ops = _trace(model, set(names))
    convs = [i for i, (op, _, _) in enumerate(ops) if op in CONV_OPS]
    if not convs:
        raise UserError(f"cannot tell the head of this model (no convolution in its forward); {PATTERN_HINT}")
    start = next((i for i, (op, _, matrix) in enumerate(ops)
                  if i > convs[-1] and (op == "linear" or (op in FC_OPS and matrix))), None)
    if start is None:
        raise UserError("cannot tell the head of this model (no fully connected layer after its last "
                        f"convolution); {PATTERN_HINT}")
    features = set().union(*(used for _, used, _ in ops[:start]))
    head = set().union(*(used for _, used, _ in ops[start:]))
    shared = sorted(names[i] for i in features & head)
    if shared:
        raise UserError(f"cannot tell the head of this model: {', '.join(shared)} "
                        f"{'is' if len(shared) == 1 else 'are'} used both before and after its first fully "
                        f"connected layer after the convolutions; {PATTERN_HINT}")
    # a tensor the forward did not pass to a torch function (num_batches_tracked) goes with its module's
    unseen = set(names) - features - head
    for module in model.modules():
        own = {id(t) for t in _own_tensors(module)}
        if own & head:
            head |= own & unseen
    vars(model)[HEAD_ATTR] = (structure, frozenset(names[i] for i in head))
    return head


def _trainable_tensors(model: nn.Module, patterns: list[str]) -> set[int]:
    """ids of the tensors of the modules that a pattern names, directly or through an enclosing module
    ("classifier" names classifier.2 too); a tensor of the model itself, outside any module, by its own
    name. A pattern that names nothing is a UsageError listing the names there are."""
    def own_named(module):
        return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]

    names = [name for name, _ in model.named_modules() if name] + [name for name, _ in own_named(model)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:24]) + (f", ... ({len(names)} in all)" if len(names) > 24 else "")
            raise UsageError(f"--trainable {pattern!r} matches no layer of this model; its layers are: {shown}")

    def named(name: str) -> bool:  # the name or an enclosing module's
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:k]), p) for k in range(1, len(parts) + 1) for p in patterns)

    return {id(t) for name, module in model.named_modules() for tname, t in own_named(module) if named(name or tname)}


def _frozen_tensors(model: nn.Module, freeze_conv: bool, freeze_bn: bool, trainable=None) -> set[int]:
    """ids of the parameters and buffers that stay exactly as loaded."""
    everything = set(_tensor_names(model))
    frozen = set()
    if freeze_conv:  # every tensor outside the head: features' weights and BatchNorm statistics
        frozen |= everything - _head_tensors(model)
    if freeze_bn:  # BatchNorm1d/2d/3d and SyncBatchNorm: statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                frozen |= {id(t) for t in _own_tensors(m)}
    if trainable:
        frozen |= everything - _trainable_tensors(model, list(trainable))
    return frozen


def apply_freezing(model: nn.Module, freeze_conv: bool, freeze_bn: bool, trainable=None) -> None:
    if freeze_bn and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warnings.warn("this model has no BatchNorm layer, so --freeze-bn changes nothing", stacklevel=2)
    frozen = _frozen_tensors(model, freeze_conv, freeze_bn, trainable)
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, freeze_conv: bool, freeze_bn: bool, trainable=None) -> None:
    """model.train(), except that every module holding frozen buffers (BatchNorm's running statistics)
    stays in eval mode, so that they do not move. Only that module's own flag: its children, and layers
    without tensors (dropout), follow model.train()."""
    frozen = _frozen_tensors(model, freeze_conv, freeze_bn, trainable)
    model.train()
    for m in model.modules():
        if any(id(b) in frozen for b in m.buffers(recurse=False)):
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


def check_batch_for_batchnorm1d(model: nn.Module, batch: int) -> None:
    """A UserError for a training batch of one image through a BatchNorm1d in training mode: BatchNorm needs
    more than one value per channel (torch would stop with a ValueError in the middle of the forward)."""
    if batch > 1:
        return
    layers = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm1d) and m.training]
    if layers:
        raise UserError(f"a training batch of one image cannot train BatchNorm1d {', '.join(layers)} (it needs "
                        "at least 2 images per batch): use --batch-size 2 or more, or freeze it (--freeze-bn)")
