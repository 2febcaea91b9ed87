"""Device choice, mixed-precision policy, backend flags, memory report, seeding, CPU threads."""

import os
import platform
import resource
import shutil
import warnings
from dataclasses import dataclass

import torch

from .errors import UsageError


def available_cpus() -> int:
    """Cores this process may run on (affinity, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_cpu_threads(local_world_size: int = 1) -> int:
    """Use the cores available to this process, shared fairly between local ranks, unless the user
    (or torchrun) chose a number with OMP_NUM_THREADS."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, available_cpus() // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def nvidia_gpu_evidence(device_file: str = "/dev/nvidia0") -> str | None:
    """What shows that this machine has an NVIDIA GPU, whatever PyTorch thinks: its device file or
    the driver's nvidia-smi; None when neither is there."""
    if os.path.exists(device_file):
        return device_file
    return "nvidia-smi" if shutil.which("nvidia-smi") else None


def broken_cuda_reason() -> str | None:
    """Why CUDA does not work on a machine that has an NVIDIA GPU (a CPU-only build of torch, a driver
    too old for torch's CUDA); None when CUDA works or there is no NVIDIA GPU."""
    if torch.cuda.is_available():
        return None
    evidence = nvidia_gpu_evidence()
    if evidence is None:
        return None
    if torch.version.cuda is None:
        return (f"an NVIDIA GPU is present ({evidence}) but torch {torch.__version__} is a CPU-only build; "
                "install a CUDA build of PyTorch")
    try:
        torch.cuda.init()  # raises with the driver's own explanation
        cause = "torch.cuda.is_available() is False"
    except Exception as exc:  # RuntimeError or AssertionError, depending on the cause
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (f"an NVIDIA GPU is present ({evidence}) but CUDA does not work in torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda}): {cause}; check the driver with nvidia-smi")


def _rank_gpu(spec: str, local_rank: int | None) -> int:
    """The GPU index of this process when --device does not name one."""
    count = torch.cuda.device_count()
    index = local_rank or 0
    if index < count:
        return index
    # A scheduler that binds one GPU to each process (SLURM --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set
    # per task) shows every process its own GPU as cuda:0 while LOCAL_RANK still counts the processes on
    # the node. Without CUDA_VISIBLE_DEVICES the process sees the whole machine, so more processes than
    # GPUs is a launch mistake (two ranks on one GPU): refuse that instead of guessing.
    if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        return 0
    raise UsageError(f"--device {spec}: LOCAL_RANK is {index} but only {count} CUDA device(s) are visible; "
                     f"start at most {count} process(es) per node")


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a usable device, or a UsageError naming --device."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _rank_gpu(spec, local_rank))
        reason = broken_cuda_reason() or "no CUDA GPU found"
        warnings.warn(f"{reason}: running on the CPU (--device auto)", stacklevel=2)
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {spec!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        reason = broken_cuda_reason() or "CUDA is not available on this machine"
        raise UsageError(f"--device {spec}: {reason} (use --device cpu or auto)")
    if device.index is None:
        return torch.device("cuda", _rank_gpu(spec, local_rank))
    if local_rank is not None:
        raise UsageError(f"--device {spec}: under torchrun every process uses the GPU of its LOCAL_RANK; "
                         "pass --device cuda or auto")
    if device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def default_eval_batch_size(device: torch.device) -> int:
    """Large batches keep a GPU busy; on a CPU, 256 images' activations still fit in the cache
    (measured 2x faster than 1024 on this project's 2-core bench machine)."""
    return 1024 if device.type == "cuda" else 256


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first CPU; the platform's processor name and no flags where
    there is no /proc/cpuinfo."""
    name, flags = "", frozenset()
    try:
        with open(path) as fh:
            for line in fh:
                if not line.strip():  # the end of the first processor's block: the others repeat it
                    break
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() in ("flags", "Features"):  # x86, ARM
                    flags = frozenset(value.split())
    except OSError:
        pass
    return name or platform.processor() or "unknown", flags


def cpu_has_fast_bf16() -> bool:
    """True where the CPU does bf16 matrix work natively (AVX512-BF16 or AMX)."""
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})


AMP_MODES = ("auto", "bf16", "fp16", "off")  # the --amp choices of every script


@dataclass(frozen=True)
class AmpPolicy:
    dtype: torch.dtype | None  # None: plain fp32
    use_scaler: bool  # fp16 needs loss scaling; bf16 does not

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


FP32, BF16, FP16 = AmpPolicy(None, False), AmpPolicy(torch.bfloat16, False), AmpPolicy(torch.float16, True)


def cuda_bf16_native(device: torch.device) -> bool:
    """bf16 in hardware: compute capability 8.0 (Ampere) or newer. torch.cuda.is_bf16_supported() by
    default also says yes where a bf16 tensor can merely be created (V100, T4), but cuDNN has no bf16
    convolutions there."""
    if torch.version.hip:  # every ROCm GPU PyTorch supports has bf16
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _cuda_amp(mode: str, device: torch.device) -> AmpPolicy:
    native_bf16 = cuda_bf16_native(device)
    if mode == "bf16" and not native_bf16:
        major, minor = torch.cuda.get_device_capability(device)
        raise UsageError(f"--amp bf16: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                         "has no bf16 convolutions (they need 8.0 or newer); use --amp fp16 or auto")
    if mode == "bf16" or (mode == "auto" and native_bf16):
        return BF16
    if mode == "fp16" or torch.cuda.get_device_capability(device) >= (7, 0):  # tensor cores from Volta on
        return FP16
    return FP32  # Pascal and older: fp16 without tensor cores gains little and risks overflow


def resolve_amp(mode: str, device: torch.device) -> AmpPolicy:
    """--amp -> the precision policy on this device. auto: bf16 on CUDA capability >= 8.0, fp16 with loss
    scaling on 7.x, fp32 below; on the CPU bf16 where it is native (AVX512-BF16, AMX), else fp32.
    An explicit bf16 on a GPU without it, or fp16 on the CPU, is a UsageError."""
    if mode not in AMP_MODES:
        raise UsageError(f"--amp {mode!r}: choose from {', '.join(AMP_MODES)}")
    if mode == "off":
        return FP32
    if device.type == "cuda":
        return _cuda_amp(mode, device)
    if mode == "fp16":
        # loss scaling (GradScaler) is a CUDA tool, and CPUs compute fp16 slower than fp32 or bf16
        raise UsageError("--amp fp16: for CUDA GPUs only; on the CPU use --amp bf16, auto or off")
    return BF16 if mode == "bf16" or cpu_has_fast_bf16() else FP32


def autocast(device: torch.device, amp: AmpPolicy):
    return torch.autocast(device.type, dtype=amp.dtype or torch.float32, enabled=amp.dtype is not None)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device


def process_memory_mb() -> dict:
    """Resident memory now and at its peak, in MiB."""
    current = None
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"rss_mb": current, "peak_rss_mb": peak}


def cuda_report(device: torch.device) -> dict:
    """What users ask about their GPU: name, capability, memory, CUDA and cuDNN versions."""
    if device.type != "cuda":
        return {"cuda_available": torch.cuda.is_available()}
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    return {
        "cuda_available": True,
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "total_memory_mb": total / 2**20,
        "free_memory_mb": free / 2**20,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(),
        "bf16_supported": cuda_bf16_native(device),
        "amp_auto": resolve_amp("auto", device).name,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Set the global backend flags for a run. Fast: cuDNN benchmarks its kernels once, which pays off
    because every batch has the same shape. Deterministic: the same kernels, in the same order, in full
    fp32 (no TF32) on every run, so that a resumed run repeats the uninterrupted one bit for bit."""
    if deterministic:
        if device.type == "cuda":
            # cuBLAS is only deterministic with a fixed workspace; read when its handle is made
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for peak_gpu_mb (per run, per model)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_mb(device: torch.device) -> float | None:
    """The most GPU memory tensors held since reset_peak_memory, in MiB; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
