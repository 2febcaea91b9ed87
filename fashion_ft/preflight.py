"""The pre-flight checks behind test_model.py, in the order they run: each passes or fails with a short reason."""

import copy
import hashlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import engine, system
from .checkpoint import LoadedCheckpoint, load_checkpoint, nonfinite_tensors, require_finite, strict_json
from .config import Config
from .data import SAMPLE_IMAGES, DeviceData, compare, given_for, load_split, make_batch, suggestion, test_halves
from .errors import UserError, first_line
from .model import count_parameters


@dataclass
class Report:
    checks: list = field(default_factory=list)  # {name, ok, detail, data} in the order they ran
    debug: bool = False  # let unexpected exceptions through, with their traceback

    def run(self, name: str, fn, *args):
        """fn(*args) -> (detail, data, value), value never None: a passed check, and value; else a failed one
        and None. A pre-flight tool reports a broken GPU or model with the rest; it does not crash on it."""
        try:
            detail, data, value = fn(*args)
        except Exception as exc:
            if self.debug and not isinstance(exc, UserError):  # a check's own verdict is never a traceback
                raise
            unexpected = f"unexpected {type(exc).__name__}: {first_line(exc)} (--debug shows more)"
            detail, data, value = str(exc) if isinstance(exc, UserError) else unexpected, {}, None
        self.checks.append({"name": name, "ok": value is not None, "detail": detail, "data": strict_json(data)})
        return value


def run_checks(args) -> Report:
    """The device and the test data once; then each model's checks and memory; then the ensemble of several.
    A bad --device or --amp is a usage error (exit 2) before any check."""
    report = Report(debug=args.debug)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the device check reports a CPU fall-back (and why) itself
        device = system.resolve_device(args.device)
    amp = system.resolve_amp(args.amp, device)
    report.run("device", check_device, device, args.require_gpu, args.device == "auto")
    n = None if args.full else args.batches * args.batch_size
    data = report.run("test data", check_data, args.data_dir, n, device, args.download)
    probs = []
    for path in args.model_path:
        prefix = f"{path}: " if len(args.model_path) > 1 else ""
        system.reset_peak_memory(device)  # per model, so that each reports its own GPU peak
        probs.append(check_model(report, prefix, Path(path), args, device, amp, data))
        report.run(prefix + "memory", check_memory, device)
    if len(probs) > 1:
        report.run("ensemble", check_ensemble, probs, data)
    return report


def check_model(report: Report, prefix: str, path: Path, args, device: torch.device, amp: system.AmpPolicy, data):
    """One model's checks, each once those it needs have passed; returns the quick eval's probabilities or None."""
    ckpt = (report.run(prefix + "file", check_file, path)
            and report.run(prefix + "load", check_load, path, args.trust_pickle, args.definition, args.model_kwargs))
    if ckpt is None:
        return None
    model = report.run(prefix + "architecture", check_arch, ckpt, device)
    if report.run(prefix + "weights finite", check_finite, ckpt) is None or model is None:
        return None
    given = given_for(args.normalize, ckpt.normalize_recorded, len(args.model_path))
    mean, std = given or (ckpt.mean, ckpt.std)
    rt = engine.ComputeSettings(device, amp, mean, std, tta_flip=args.tta == "flip")
    report.run(prefix + "forward pass", check_forward, model, rt)
    if not (given or ckpt.normalize_recorded):
        report.run(prefix + "normalisation", check_default_normalization, model, args.data_dir, mean, std)
    report.run(prefix + "train step", check_train_step, model, data, mean, std, device)
    probs = report.run(prefix + "quick eval", check_eval, model, rt, data, args.batch_size, args.min_accuracy)
    if probs is not None and args.full and ckpt.split and ckpt.split.validation == "test-half":
        report.run(prefix + "held-out half", check_held_out, probs, data.labels, ckpt.split.seed)
    return probs


def check_device(device: torch.device, require_gpu: bool, auto: bool):
    info = system.device_report(device)
    broken = system.broken_cuda_reason() if device.type == "cpu" and (auto or require_gpu) else None
    if broken:  # an NVIDIA GPU that CUDA cannot use: never pass on the CPU
        raise UserError(broken)
    if require_gpu and device.type != "cuda":
        raise UserError(f"no CUDA GPU available{' (Apple MPS is not one)' * (device.type == 'mps')} (--require-gpu)")
    if device.type == "cpu":
        return "no CUDA GPU: running on the CPU", info, True
    a = torch.randn(256, 256, device=device)
    if not torch.allclose((a @ a).cpu(), a.cpu() @ a.cpu(), atol=1e-2, rtol=1e-3):
        raise UserError(f"{info.get('name', 'MPS')}: a matrix product on the GPU disagrees with the CPU")
    if device.type == "mps":
        return f"Apple MPS ({info.get('name', 'GPU')}), amp auto: {info.get('amp_auto')}", info, True
    return (f"{info['name']} (capability {info['capability']}), {info['free_memory_mb']:.0f} of "
            f"{info['total_memory_mb']:.0f} MiB free, CUDA {info['cuda_version']}, cuDNN {info['cudnn_version']}",
            info, True)


# An accuracy measured on fewer images says little (on 100 images one standard error is already about 3 points
# at 90%): a test set this small fails the data check.
MIN_TEST_IMAGES = 100


def check_data(data_dir, n: int | None, device, allow_download: bool):
    """The first n test images (None: all)."""
    images, labels = load_split(data_dir, "test", allow_download)
    if len(labels) < MIN_TEST_IMAGES:
        raise UserError(f"only {len(labels)} images in the test files; a meaningful accuracy needs at least "
                        f"{MIN_TEST_IMAGES}")
    data = DeviceData.create(images[:n], labels[:n], device)
    return f"{len(data)} Fashion-MNIST test images", {"images": len(data)}, data


def check_file(path: Path):
    if not path.is_file():  # a folder, or a named pipe whose read would wait for a writer
        raise UserError(f"{path}: {'not a file' if path.exists() else 'not found'}")
    content = path.read_bytes()
    if not content:
        raise UserError(f"{path}: empty file (0 bytes)")
    sha, size = hashlib.sha256(content).hexdigest(), len(content)
    return f"{path}: {size / 1e6:.2f} MB, sha256 {sha[:16]}...", {"bytes": size, "sha256": sha}, sha


def check_load(path: Path, trust_pickle: bool, model_def, model_kwargs):
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle, model_def=model_def, model_kwargs=model_kwargs)
    how = "trusted unpickling (--trust-pickle): code in the file could run" if ckpt.unpickled else "weights_only=True"
    return f"{ckpt.source_format}, loaded with {how}", {"format": ckpt.source_format}, ckpt


def check_arch(ckpt: LoadedCheckpoint, device: torch.device):
    model = ckpt.build().to(device)  # load_state_dict is strict: every key and shape matched
    total, _ = count_parameters(model)
    kwargs = ", ".join(f"{k}={v}" for k, v in ckpt.arch_kwargs.items())
    name = f"{ckpt.model_def.given}:{ckpt.model_def.cls}" if ckpt.model_def else ckpt.arch
    detail = f"{name} ({kwargs}); all {len(ckpt.state_dict)} tensors match; {total:,} parameters"
    return detail, {"arch": ckpt.arch, "arch_kwargs": ckpt.arch_kwargs, "parameters": total}, model


def check_finite(ckpt: LoadedCheckpoint):
    require_finite(ckpt)
    return "no NaN or Inf in any weight", {}, True


def _random_batch(n: int, device: torch.device):
    """Seeded random images and labels: every kernel runs, on the same input every time."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return images.to(device), torch.randint(0, 10, (n,), generator=gen).to(device)


def check_forward(model, rt: engine.ComputeSettings, n: int = 8):
    """A model's scores for random images on the device (that it gives 10 per image, the load checked)."""
    logits = engine.predict_logits(model, _random_batch(n, rt.device)[0], rt, n)
    if not torch.isfinite(logits).all():
        raise UserError("output holds NaN or Inf")
    if torch.allclose(logits, logits[:1].expand_as(logits)):  # a dead network, or one that ignores its input
        raise UserError(f"the same output for {n} different images")
    return f"output {n} x 10, finite, varies with the image", {}, True


def check_default_normalization(model, data_dir, mean: float, std: float):
    """For a file that records no normalisation (so the default runs): the common ones, on the first training
    images (the test images never choose anything)."""
    images, labels = load_split(data_dir, "train")
    scores = compare(model, images.unsqueeze(1), labels, (mean, std))
    if advice := suggestion(scores, (mean, std)):
        raise UserError(f"{advice}; pass it to both scripts")
    return (f"none recorded: {scores[mean, std]:.0%} on {SAMPLE_IMAGES} training images with {mean:g} {std:g}, "
            "and no common normalisation does clearly better", {"accuracy": scores[mean, std]}, True)


def check_train_step(model, data: DeviceData | None, mean: float, std: float, device: torch.device, n: int = 64):
    """Three forward, backward and optimizer steps on a copy of model, as finetune_gpu.py's defaults take them
    on this device (its --amp auto precision, memory layout, optimizer and loss scaler), on real test images
    when there are some (a realistic loss), else random ones."""
    cfg = Config()
    memory_format, why_not = engine.choose_memory_format(model, device, cfg.channels_last)
    rt = engine.ComputeSettings(device, system.resolve_amp(cfg.amp, device), mean, std, memory_format)
    trained = copy.deepcopy(model).to(memory_format=memory_format).train()
    optimizer = engine.build_optimizer(trained, cfg, cfg.lr)
    step = engine.TrainStep(trained, optimizer, engine.build_schedulers(optimizer, cfg, 1),
                            torch.amp.GradScaler(device.type, enabled=rt.amp.use_scaler),
                            cfg.label_smoothing, cfg.max_grad_norm)
    images, labels = (data.images[:n], data.labels[:n]) if data is not None else _random_batch(n, device)
    x = make_batch(images, None, None, mean, std, memory_format)
    before = [p.detach().clone() for p in trained.parameters()]
    how = f"{cfg.optimizer} step under amp {rt.amp.name}"
    for _ in range(3):  # with fp16 the loss scaler may skip one (an overflow at its starting scale)
        loss, _ = step(x, labels, rt)
    # NaN or Inf in a step's output makes its loss so, and spreads to the weights unless the loss scaler skips it
    if not torch.isfinite(loss) or nonfinite_tensors(trained.state_dict()):
        raise UserError(f"the {how} gave a non-finite loss or weights")
    if all(torch.equal(b, p) for b, p in zip(before, trained.parameters())):
        raise UserError(f"the {how}, taken three times, changed no weight")
    detail = f"forward, backward and {how}: loss {loss.item():.4f}, weights updated{f'; {why_not}' * bool(why_not)}"
    data = {"amp": rt.amp.name, "optimizer": cfg.optimizer, "loss": loss.item(), "channels_last": why_not is None}
    return detail, data, True


def check_eval(model, rt: engine.ComputeSettings, data: DeviceData | None, batch_size: int, min_acc: float):
    if data is None:
        raise UserError("not run: no test data")
    engine.predict_logits(model, data.images[:batch_size], rt, batch_size)  # warm-up: the clock starts after it
    system.synchronize(rt.device)
    start = time.perf_counter()
    logits = engine.predict_logits(model, data.images, rt, batch_size)
    system.synchronize(rt.device)
    seconds, n = time.perf_counter() - start, len(data)
    if not torch.isfinite(logits).all():
        raise UserError(f"the model's output holds NaN or Inf on {n} test images")
    loss, acc = engine.logit_metrics(logits, data.labels)
    detail = (f"{n} test images{' with flip TTA' if rt.tta_flip else ''}: accuracy {100 * acc:.2f}%, "
              f"loss {loss:.4f}, {n / seconds:.0f} img/s")
    if not acc >= min_acc:  # also when it is NaN
        raise UserError(f"{detail}; below the sane minimum of {100 * min_acc:.0f}%")
    return detail, {"images": n, "accuracy": acc, "loss": loss, "seconds": seconds, "images_per_s": n / seconds,
                    "tta": "flip" if rt.tta_flip else "none"}, logits.softmax(1)


def check_held_out(probs: torch.Tensor, labels: torch.Tensor, seed: int):
    """A model selected on one half of the test images (--val-from test-half): the other half is the
    accuracy that selection never saw."""
    test_idx = test_halves(labels.cpu(), seed)[0].to(labels.device)
    acc = (probs[test_idx].argmax(1) == labels[test_idx]).float().mean().item()
    return (f"this model was selected on half of the test images (split seed {seed}); on the other "
            f"{len(test_idx)}: accuracy {100 * acc:.2f}%", {"images": len(test_idx), "accuracy": acc}, True)


def check_memory(device: torch.device):
    """The process's memory (now: where /proc tells), and on a GPU the peak since reset_peak_memory (per model)."""
    mem = {**system.process_memory_mb(), "peak_gpu_mb": system.peak_gpu_mb(device)}
    sizes = {"process RSS": mem["rss_mb"], "peak RSS": mem["peak_rss_mb"], "peak GPU memory": mem["peak_gpu_mb"]}
    return ", ".join(f"{what} {mb:.1f} MiB" for what, mb in sizes.items() if mb is not None), mem, True


def check_ensemble(probs: list, data: DeviceData | None):
    if data is None or any(p is None for p in probs):
        raise UserError(f"not run: {'no test data' if data is None else 'a model failed its checks'}")
    acc = (torch.stack(probs).mean(0).argmax(1) == data.labels).float().mean().item()
    return f"{len(probs)} models, averaged probabilities: accuracy {100 * acc:.2f}%", {"accuracy": acc}, acc
