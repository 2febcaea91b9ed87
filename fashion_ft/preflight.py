"""The pre-flight checks behind test_model.py: each check passes or fails with a short reason."""

import copy
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import LoadedCheckpoint, load_checkpoint, nonfinite_tensors, strict_json
from .config import Config
from .data import FILES, DeviceData, find_data_dir, load_split, make_batch, test_halves
from .engine import ComputeSettings, TrainStep, choose_memory_format, logit_metrics, predict_logits
from .errors import UserError, first_line
from .model import count_parameters
from .normalization import SAMPLE_IMAGES, compare, suggestion
from .optim import build_optimizer, build_schedulers
from .outputs import resolve_path
from .system import broken_cuda_reason, device_report, peak_gpu_mb, process_memory_mb, resolve_amp, synchronize

# An accuracy measured on fewer images says little (on 100 images one standard error is already about
# 3 points at 90%), and on none it is NaN: a test set this small fails the data check.
MIN_TEST_IMAGES = 100
TRAIN_STEP_IMAGES = 64


class CheckFailed(Exception):
    """A check's own verdict: fail with this reason."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    data: dict = field(default_factory=dict)


@dataclass
class Report:
    checks: list = field(default_factory=list)
    debug: bool = False  # let unexpected exceptions through, with their traceback

    def run(self, name: str, fn, *args):
        """Run fn(*args) -> (detail, data, value); any UserError/CheckFailed becomes a failed check."""
        try:
            detail, data, value = fn(*args)
        except (UserError, CheckFailed) as exc:
            self.checks.append(Check(name, False, str(exc)))
            return None
        except Exception as exc:  # a pre-flight tool reports a broken GPU or model, it does not crash on it
            if self.debug:
                raise
            detail = f"unexpected {type(exc).__name__}: {first_line(exc)} (--debug shows more)"
            self.checks.append(Check(name, False, detail))
            return None
        self.checks.append(Check(name, True, detail, data))
        return value

    def skip(self, name: str, reason: str) -> None:
        self.checks.append(Check(name, False, f"not run: {reason}"))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        """The report for strict JSON: no NaN or Infinity (see checkpoint.strict_json)."""
        checks = [{**asdict(c), "data": strict_json(c.data)} for c in self.checks]
        return {"passed": self.passed, "checks": checks}


def check_file(path: Path):
    resolve_path(path, "--model-path")  # a symlink loop is worded as for every other path
    if not path.is_file():
        raise CheckFailed(f"{path}: not found" if not path.exists() else f"{path}: not a file")
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise CheckFailed(f"{path}: cannot read: {exc.strerror}") from None
    size = path.stat().st_size
    if size == 0:
        raise CheckFailed(f"{path}: empty file (0 bytes)")
    sha = digest.hexdigest()
    return f"{path}: {size / 1e6:.2f} MB, sha256 {sha[:16]}...", {"bytes": size, "sha256": sha}, sha


def check_load(path: Path, trust_pickle: bool, model_def=None, model_kwargs=None):
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle, model_def=model_def, model_kwargs=model_kwargs)
    how = "trusted unpickling (--trust-pickle): code in the file could run" if ckpt.unpickled else "weights_only=True"
    return f"{ckpt.source_format}, loaded with {how}", {"format": ckpt.source_format}, ckpt


def check_arch(ckpt: LoadedCheckpoint):
    model = ckpt.build()  # load_state_dict is strict: every key and shape matched
    total, _ = count_parameters(model)
    kwargs = ", ".join(f"{k}={v}" for k, v in ckpt.arch_kwargs.items())
    name = f"{ckpt.model_def.given}:{ckpt.model_def.cls}" if ckpt.model_def else ckpt.arch
    detail = f"{name} ({kwargs}); all {len(ckpt.state_dict)} tensors match; {total:,} parameters"
    return detail, {"arch": ckpt.arch, "arch_kwargs": ckpt.arch_kwargs, "parameters": total}, model


def check_finite(ckpt: LoadedCheckpoint):
    bad = nonfinite_tensors(ckpt.state_dict)
    if bad:
        raise CheckFailed(f"NaN/Inf in {len(bad)} tensor(s): {', '.join(bad[:4])}")
    return "no NaN or Inf in any weight", {}, True


def check_device(device: torch.device, require_gpu: bool, auto: bool = True):
    info = device_report(device)  # mps_report on Apple's GPU, else cuda_report
    if device.type in ("cuda", "mps"):
        a = torch.randn(256, 256, device=device)
        if not torch.allclose((a @ a).cpu(), a.cpu() @ a.cpu(), atol=1e-2, rtol=1e-3):
            raise CheckFailed(f"{info.get('name', 'MPS')}: a matrix product on the GPU disagrees with the CPU")
    if device.type == "cuda":
        return (f"{info['name']} (capability {info['capability']}), {info['free_memory_mb']:.0f} of "
                f"{info['total_memory_mb']:.0f} MiB free, CUDA {info['cuda_version']}, cuDNN {info['cudnn_version']}",
                info, True)
    if device.type == "mps":
        if require_gpu:
            raise CheckFailed("Apple MPS is not a CUDA GPU (--require-gpu)")
        return f"Apple MPS ({info.get('name', 'GPU')}), amp auto: {info.get('amp_auto')}", info, True
    broken = broken_cuda_reason()
    if broken and (auto or require_gpu):  # an NVIDIA GPU that CUDA cannot use: never pass on the CPU
        raise CheckFailed(broken)
    if require_gpu:
        raise CheckFailed("no CUDA GPU available (--require-gpu)")
    return "no CUDA GPU: running on the CPU", info, True


def _random_batch(n: int, device: torch.device):
    """Seeded random images and labels: every kernel runs, on the same input every time."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return images.to(device), torch.randint(0, 10, (n,), generator=gen).to(device)


def check_train_step(model, data: DeviceData | None, mean: float, std: float, device: torch.device):
    """Forward, backward and optimizer step on a copy of model, exactly as finetune_gpu.py's defaults run
    them on this device: its --amp auto precision policy, memory layout, optimizer and loss scaler. With
    fp16 the loss scaler may skip the first step (an overflow at its starting scale), so up to three steps
    are taken; a real step changes the weights."""
    cfg = Config()
    memory_format, why_not = choose_memory_format(model, device, cfg.channels_last)
    rt = ComputeSettings(device, resolve_amp(cfg.amp, device), mean, std, memory_format)
    trained = copy.deepcopy(model).to(memory_format=memory_format).train()
    optimizer = build_optimizer(trained, cfg, cfg.lr)
    step = TrainStep(trained, optimizer, build_schedulers(optimizer, cfg, 1),
                     torch.amp.GradScaler(device.type, enabled=rt.amp.use_scaler),
                     cfg.label_smoothing, cfg.max_grad_norm)
    # real test images when there are some (a realistic loss), else random ones (still every kernel)
    n = TRAIN_STEP_IMAGES
    images, labels = (data.images[:n], data.labels[:n]) if data is not None else _random_batch(n, device)
    x = make_batch(images, None, None, mean, std, memory_format)
    before = [p.detach().clone() for p in trained.parameters()]
    for _ in range(3):
        loss, logits = step(x, labels, rt)
        if not (torch.isfinite(loss) and torch.isfinite(logits).all()):
            raise CheckFailed(f"the training step under amp {rt.amp.name} gave a non-finite loss or output")
        if any(not torch.equal(b, p) for b, p in zip(before, trained.parameters())):
            break
    else:
        raise CheckFailed(f"three {cfg.optimizer} steps under amp {rt.amp.name} changed no weight")
    if nonfinite_tensors(trained.state_dict()):
        raise CheckFailed(f"the {cfg.optimizer} step under amp {rt.amp.name} left NaN/Inf weights")
    loss = loss.item()
    detail = f"forward, backward and {cfg.optimizer} step under amp {rt.amp.name}: loss {loss:.4f}, weights updated"
    return (detail + (f"; {why_not}" if why_not else ""),
            {"amp": rt.amp.name, "optimizer": cfg.optimizer, "loss": loss, "channels_last": why_not is None}, True)


def check_forward(model, rt: ComputeSettings, n: int = 8):
    logits = predict_logits(model, _random_batch(n, rt.device)[0], rt, n)
    if tuple(logits.shape) != (n, 10):
        raise CheckFailed(f"output shape {tuple(logits.shape)}, expected ({n}, 10)")
    if not torch.isfinite(logits).all():
        raise CheckFailed("output holds NaN or Inf")
    if torch.allclose(logits, logits[:1].expand_as(logits)):  # a dead network, or one that ignores its input
        raise CheckFailed(f"the same output for {n} different images")
    # log_softmax outputs (a model trained with nll_loss) are log-probabilities: each row's logsumexp is 0
    log_probs = torch.allclose(logits.logsumexp(1), torch.zeros(n, device=logits.device), atol=1e-3)
    kind = "log-probabilities" if log_probs else "logits"
    return f"output {n} x 10, finite, varies with the image ({kind})", {"outputs": kind}, True


def check_normalization(model, train: DeviceData, mean: float, std: float):
    """For a file that does not record its normalisation: the common ones, on training images."""
    current = (mean, std)
    scores = compare(model, train.images, train.labels.cpu(), current)
    advice = suggestion(scores, current)
    if advice:
        raise CheckFailed(f"{advice}; pass it to both scripts")
    return (f"none recorded: {scores[current]:.0%} on {SAMPLE_IMAGES} training images with {mean:g} {std:g}, and no "
            "common normalisation does clearly better", {"accuracy": scores[current]}, True)


def check_eval(model, rt: ComputeSettings, data: DeviceData, batch_size: int, min_acc: float):
    predict_logits(model, data.images[:batch_size], rt, batch_size)  # warm-up: the clock starts after it
    synchronize(rt.device)
    start = time.perf_counter()
    logits = predict_logits(model, data.images, rt, batch_size)
    synchronize(rt.device)
    seconds, n = time.perf_counter() - start, len(data)
    if not torch.isfinite(logits).all():
        raise CheckFailed(f"the model's output holds NaN or Inf on {n} test images")
    loss, acc = logit_metrics(logits, data.labels)
    stats = {"images": n, "accuracy": acc, "loss": loss, "seconds": seconds, "images_per_s": n / seconds,
             "tta": "flip" if rt.tta_flip else "none"}
    detail = (f"{n} test images{' with flip TTA' if rt.tta_flip else ''}: accuracy {100 * acc:.2f}%, "
              f"loss {loss:.4f}, {n / seconds:.0f} img/s")
    if not acc >= min_acc:  # also when it is NaN
        raise CheckFailed(f"{detail}; below the sane minimum of {100 * min_acc:.0f}%")
    return detail, stats, logits.softmax(1)


def check_held_out(probs: torch.Tensor, labels: torch.Tensor, seed: int):
    """A model selected on one half of the test images (--val-from test-half): the other half is the
    accuracy that selection never saw."""
    test_idx = test_halves(labels.cpu(), seed)[0].to(labels.device)
    acc = (probs[test_idx].argmax(1) == labels[test_idx]).float().mean().item()
    return (f"this model was selected on half of the test images (split seed {seed}); on the other "
            f"{len(test_idx)}: accuracy {100 * acc:.2f}%", {"images": len(test_idx), "accuracy": acc}, True)


def check_memory(device: torch.device):
    """The process's memory, and on a GPU the peak since system.reset_peak_memory (per model)."""
    mem = process_memory_mb()
    detail = f"process RSS {mem['rss_mb']:.0f} MiB (peak {mem['peak_rss_mb']:.0f} MiB)"
    peak = peak_gpu_mb(device)
    if peak is not None:
        mem["peak_gpu_mb"] = peak
        detail += f", peak GPU memory {peak:.1f} MiB"
    return detail, mem, True


def check_ensemble(probs: list, labels: torch.Tensor):
    acc = (torch.stack(probs).mean(0).argmax(1) == labels).float().mean().item()
    return f"{len(probs)} models, averaged probabilities: accuracy {100 * acc:.2f}%", {"accuracy": acc}, acc


def check_data(data_dir, split: str, n: int | None, device, allow_download: bool = False):
    """The first n images of a split (None: all). The normalisation check takes a training sample: the
    test images never choose anything."""
    images, labels = load_split(data_dir, split, allow_download)
    if split == "test" and len(labels) < MIN_TEST_IMAGES:
        path = find_data_dir(data_dir, "test") / FILES["test"][0]
        raise CheckFailed(f"{path}: only {len(labels)} test images; a meaningful accuracy needs at least "
                          f"{MIN_TEST_IMAGES}")
    data = DeviceData.create(images[:n], labels[:n], device)
    return f"{len(data)} Fashion-MNIST {'test' if split == 'test' else 'training'} images", {"images": len(data)}, data
