"""The pre-flight checks behind test_model.py: each check passes or fails with a short reason."""

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import LoadedCheckpoint, load_checkpoint, nonfinite_tensors
from .data import DeviceData, load_split
from .engine import Runtime, logit_metrics, predict_logits
from .errors import UserError
from .model import count_parameters
from .system import cuda_report, process_memory_mb, synchronize


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
            first_line = (str(exc).strip().splitlines() or [""])[0]
            self.checks.append(Check(name, False, f"unexpected {type(exc).__name__}: {first_line} (--debug shows more)"))
            return None
        self.checks.append(Check(name, True, detail, data))
        return value

    def skip(self, name: str, reason: str) -> None:
        self.checks.append(Check(name, False, f"not run: {reason}"))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}


# ---------------------------------------------------------------- the checks

def check_file(path: Path):
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


def check_load(path: Path, trust_pickle: bool):
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    how = "trusted unpickling (--trust-pickle)" if "trusted" in ckpt.source_format else "weights_only=True"
    return f"{ckpt.source_format}, loaded with {how}", {"format": ckpt.source_format}, ckpt


def check_arch(ckpt: LoadedCheckpoint):
    model = ckpt.build()  # load_state_dict is strict: every key and shape matched
    total, _ = count_parameters(model)
    kwargs = ", ".join(f"{k}={v}" for k, v in ckpt.arch_kwargs.items())
    detail = f"{ckpt.arch} ({kwargs}); all {len(ckpt.state_dict)} tensors match; {total:,} parameters"
    return detail, {"arch": ckpt.arch, "arch_kwargs": ckpt.arch_kwargs, "parameters": total}, model


def check_finite(ckpt: LoadedCheckpoint):
    bad = nonfinite_tensors(ckpt.state_dict)
    if bad:
        raise CheckFailed(f"NaN/Inf in {len(bad)} tensor(s): {', '.join(bad[:4])}")
    return "no NaN or Inf in any weight", {}, True


def check_device(device: torch.device, require_gpu: bool):
    info = cuda_report(device)
    if device.type != "cuda":
        if require_gpu:
            raise CheckFailed("no CUDA GPU available (--require-gpu)")
        return "no CUDA GPU: running on the CPU", info, True
    a = torch.randn(256, 256, device=device)
    if not torch.allclose((a @ a).cpu(), a.cpu() @ a.cpu(), atol=1e-2, rtol=1e-3):
        raise CheckFailed(f"{info['name']}: a matrix product on the GPU disagrees with the CPU")
    detail = (f"{info['name']} (capability {info['capability']}), {info['free_memory_mb']:.0f} of "
              f"{info['total_memory_mb']:.0f} MiB free, CUDA {info['cuda_version']}, cuDNN {info['cudnn_version']}")
    return detail, info, True


def check_forward(model, rt: Runtime, n: int = 8):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen).to(rt.device)
    logits = predict_logits(model, images, rt, n)
    if tuple(logits.shape) != (n, 10):
        raise CheckFailed(f"output shape {tuple(logits.shape)}, expected ({n}, 10)")
    if not torch.isfinite(logits).all():
        raise CheckFailed("output holds NaN or Inf")
    sums = logits.softmax(1).sum(1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise CheckFailed(f"probabilities sum to {sums.min().item():.4f}..{sums.max().item():.4f}, not 1")
    return f"output {n} x 10, finite, probabilities sum to 1", {}, True


def eval_logits(model, rt: Runtime, data: DeviceData, batch_size: int):
    """(logits, seconds) with the clock started after one warm-up batch."""
    predict_logits(model, data.images[:batch_size], rt, batch_size)
    synchronize(rt.device)
    start = time.perf_counter()
    logits = predict_logits(model, data.images, rt, batch_size)
    synchronize(rt.device)
    return logits, time.perf_counter() - start


def check_eval(model, rt: Runtime, data: DeviceData, batch_size: int, min_acc: float):
    logits, seconds = eval_logits(model, rt, data, batch_size)
    loss, acc = logit_metrics(logits, data.labels)
    stats = {"images": len(data), "accuracy": acc, "loss": loss, "seconds": seconds,
             "images_per_s": len(data) / seconds, "tta": "flip" if rt.tta_flip else "none"}
    detail = f"{len(data)} test images{' with flip TTA' if rt.tta_flip else ''}: accuracy {100 * acc:.2f}%, loss {loss:.4f}, {len(data) / seconds:.0f} img/s"
    if acc < min_acc:
        raise CheckFailed(f"{detail}; below the sane minimum of {100 * min_acc:.0f}%")
    return detail, stats, logits.softmax(1)


def check_memory(device: torch.device):
    mem = process_memory_mb()
    detail = f"process RSS {mem['rss_mb']:.0f} MiB (peak {mem['peak_rss_mb']:.0f} MiB)"
    if device.type == "cuda":
        mem["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        detail += f", peak GPU memory {mem['peak_gpu_mb']:.1f} MiB"
    return detail, mem, True


def check_ensemble(probs: list, labels: torch.Tensor):
    acc = (torch.stack(probs).mean(0).argmax(1) == labels).float().mean().item()
    return f"{len(probs)} models, averaged probabilities: accuracy {100 * acc:.2f}%", {"accuracy": acc}, acc


def load_eval_data(data_dir, n: int | None, device, allow_download: bool = False) -> DeviceData:
    images, labels = load_split(data_dir, "test", allow_download)
    if n is not None:
        images, labels = images[:n], labels[:n]
    return DeviceData.create(images, labels, device)


def check_data(data_dir, n, device, allow_download: bool = False):
    data = load_eval_data(data_dir, n, device, allow_download)
    return f"{len(data)} Fashion-MNIST test images", {"images": len(data)}, data
