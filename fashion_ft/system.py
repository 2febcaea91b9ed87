"""Device choice, mixed-precision policy, backend flags, memory report, seeding, CPU threads, torchrun.

Every GPU decision is made from what torch reports (torch.cuda, torch.backends.mps), so that each is tested on
any machine with those queries replaced."""

import contextlib
import datetime
import os
import platform
import re
import resource
import shutil
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from .errors import UsageError, chain, first_line

# ---------------------------------------------------------------- torchrun: ranks, the process group, collectives

# A rank that dies leaves the others waiting in a collective; this bounds the wait.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=5)

# What gloo and NCCL put in a plain RuntimeError when another rank has gone away.
PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "third_party/gloo",
                        "processgroupgloo", "processgroupnccl", "ncclremoteerror", "ncclsystemerror", "socket timeout",
                        "connectfullmesh")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # started by torchrun (or another launcher setting RANK and WORLD_SIZE)

    @property
    def enabled(self) -> bool:
        return self.launched or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(env=None) -> DistInfo:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (WORLD_SIZE=1 included)."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return DistInfo()
    world = int(env["WORLD_SIZE"])
    return DistInfo(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world)),
                    launched=True)


def init(info: DistInfo, device: torch.device) -> None:
    """The process group; on CUDA each rank first makes its own GPU the current device, so that
    NCCL and anything that uses the current device (barrier, caches) do not all land on GPU 0."""
    if not info.enabled or tdist.is_initialized():
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT,
                             device_id=device if cuda else None)


def backend() -> str | None:
    """The process group's backend (nccl, gloo), None without torchrun."""
    return tdist.get_backend() if tdist.is_initialized() else None


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


@contextmanager
def main_process_first(info: DistInfo):
    """Local rank 0 runs the block (a download into a shared folder) before the machine's other ranks. It
    reaches the barrier even when the block fails, so that the others fail on their own, not at the timeout."""
    first = info.local_rank == 0
    if info.enabled and not first:
        barrier()
    try:
        yield
    finally:
        if info.enabled and first:
            barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def per_rank(value: torch.Tensor) -> list[float]:
    """Every rank's value of a scalar tensor, on every rank: one all-reduce of a vector that holds
    each rank's value in its own slot (a sum with zeros keeps NaN and Inf as they are)."""
    if not tdist.is_initialized():
        return [float(value)]
    slots = torch.zeros(tdist.get_world_size(), device=value.device, dtype=torch.float32)
    slots[tdist.get_rank()] = value.float()
    tdist.all_reduce(slots, op=tdist.ReduceOp.SUM)
    return slots.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any one (so all ranks stop at the same step)."""
    return any(per_rank(torch.tensor(float(flag), device=device)))


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


@torch.no_grad()
def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Rank `src`'s tensors on every rank, each through a contiguous copy: collectives refuse channels_last."""
    if tdist.is_initialized():
        for t in tensors:
            flat = t.contiguous()
            tdist.broadcast(flat, src=src)
            t.copy_(flat)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """BatchNorm statistics drift apart across ranks (each normalises its own batches; DDP averages only the
    gradients): before evaluating, so that every rank evaluates what rank 0 saves."""
    broadcast_tensors(list(module.buffers()), src)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` (or its cause) says another rank went away: a DistError, or gloo's plain RuntimeError."""
    return any(isinstance(e, tdist.DistError) or (isinstance(e, RuntimeError) and any(
        m in str(e).lower() for m in PEER_FAILURE_MARKERS)) for e in chain(exc))


def available_cpus() -> int:
    """Cores this process may run on (its affinity where the OS has one, as Linux does; not the machine's total)."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, len(cores))


def set_cpu_threads(local_world_size: int = 1) -> None:
    """The available cores shared between local ranks, unless OMP_NUM_THREADS (the user's, or torchrun's) says."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, available_cpus() // local_world_size))


def nvidia_gpu_evidence(device_file: str = "/dev/nvidia0") -> str | None:
    """What shows an NVIDIA GPU, whatever torch thinks: its device file or the driver's nvidia-smi."""
    if os.path.exists(device_file):
        return device_file
    return "nvidia-smi" if shutil.which("nvidia-smi") else None


def broken_cuda_reason() -> str | None:
    """Why CUDA does not work on a machine with an NVIDIA GPU (a CPU-only torch, a driver too old for torch's
    CUDA); None when it works or there is no such GPU."""
    evidence = None if torch.cuda.is_available() else nvidia_gpu_evidence()
    if evidence is None:
        return None
    if torch.version.cuda is None:
        return (f"an NVIDIA GPU is present ({evidence}) but torch {torch.__version__} is a CPU-only build; "
                "install a CUDA build of PyTorch")
    try:
        torch.cuda.init()  # raises with the driver's own explanation
        cause = "torch.cuda.is_available() is False"
    except Exception as exc:  # RuntimeError or AssertionError, depending on the cause
        cause = first_line(exc) or type(exc).__name__
    return (f"an NVIDIA GPU is present ({evidence}) but CUDA does not work in torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda}): {cause}; check the driver with nvidia-smi")


# DDP runs collectives even with one process, and no torch.distributed backend takes MPS tensors.
MPS_NO_DISTRIBUTED = "torchrun is not supported on Apple MPS: neither gloo nor NCCL takes MPS tensors"
# Training diverges otherwise: NCHW input gives the right gradients there.
CHANNELS_LAST_MPS_REASON = "channels_last is off on MPS: BatchNorm backward is wrong there (pytorch/pytorch#175189)"


def channels_last_ok(device: torch.device) -> bool:
    return device.type != "mps"  # CHANNELS_LAST_MPS_REASON


def mps_unavailable_reason() -> str | None:
    """Why this torch cannot use an Apple GPU (MPS); None where it can."""
    if torch.backends.mps.is_available():
        return None
    if not torch.backends.mps.is_built():
        return f"torch {torch.__version__} is not built with MPS (Apple GPU) support"
    return f"torch {torch.__version__} finds no Apple GPU that MPS can use (it needs a recent macOS)"


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """--device -> a usable device, or a UsageError. auto: CUDA, else Apple MPS, else the CPU (warning why).
    local_rank is given under torchrun only: there MPS is refused, and auto skips it for the CPU."""
    if spec == "auto":
        return _auto_device(local_rank)
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cpu":
        return device
    if device.type == "mps":
        if reason := mps_unavailable_reason():
            raise UsageError(f"--device {spec}: {reason} (use --device cpu or auto)")
        if device.index not in (None, 0):
            raise UsageError(f"--device {spec}: there is one MPS device (mps, or mps:0)")
        if local_rank is not None:
            raise UsageError(f"--device {spec}: {MPS_NO_DISTRIBUTED}; use --device cpu under torchrun")
        return torch.device("mps", 0)  # what tensors on MPS report as their device
    if device.type != "cuda":
        raise UsageError(f"--device {spec!r}: only cpu, cuda and mps are supported")
    if not torch.cuda.is_available():
        reason = broken_cuda_reason() or "CUDA is not available on this machine"
        raise UsageError(f"--device {spec}: {reason} (use --device cpu or auto)")
    if device.index is None:
        return torch.device("cuda", _rank_gpu(spec, local_rank))
    if local_rank is not None:
        raise UsageError(f"--device {spec}: under torchrun each process uses its LOCAL_RANK's GPU; pass --device cuda")
    if device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def _auto_device(local_rank: int | None) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", _rank_gpu("auto", local_rank))
    broken, no_mps = broken_cuda_reason(), mps_unavailable_reason()
    if broken is None and no_mps is None:
        if local_rank is None:
            return torch.device("mps", 0)
        reason = MPS_NO_DISTRIBUTED
    else:
        reason = broken or "no CUDA GPU found"
        if no_mps and torch.backends.mps.is_built():  # a macOS build of torch: why its Apple GPU is not used
            reason += f", and {no_mps}"
    warnings.warn(f"{reason}: running on the CPU (--device auto)", stacklevel=3)  # at resolve_device's caller
    return torch.device("cpu")


def _rank_gpu(spec: str, local_rank: int | None) -> int:
    """The GPU index of this process when --device does not name one."""
    count, index = torch.cuda.device_count(), local_rank or 0
    if index < count:
        return index
    # A scheduler that binds one GPU to each process (SLURM --gpus-per-task=1) shows it as cuda:0 while LOCAL_RANK
    # counts the node's processes; without CUDA_VISIBLE_DEVICES this is two ranks on one GPU, a launch mistake.
    if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        return 0
    raise UsageError(f"--device {spec}: LOCAL_RANK is {index} but only {count} CUDA device(s) are visible; "
                     f"start at most {count} process(es) per node")


# Large batches keep a GPU (CUDA or MPS) busy; on a CPU, 256 images' activations still fit in the cache
# (measured 2x faster than 1024 on this project's 2-core bench machine).
EVAL_BATCH_SIZE = {"gpu": 1024, "cpu": 256}


def default_eval_batch_size(device: torch.device) -> int:
    return EVAL_BATCH_SIZE["gpu" if device.type in ("cuda", "mps") else "cpu"]


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first CPU (the others repeat it); without /proc, the platform's name."""
    text = ""
    with contextlib.suppress(OSError), open(path) as fh:
        text = fh.read().split("\n\n")[0]
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}
    flags = fields.get("flags", fields.get("Features", ""))  # x86, ARM
    return fields.get("model name") or platform.processor() or "unknown", frozenset(flags.split())


def cpu_has_fast_bf16() -> bool:
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})  # bf16 matrix work in hardware


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
    """bf16 in hardware: compute capability 8.0 (Ampere) or newer, or any ROCm GPU. torch.cuda.is_bf16_supported()
    also says yes where a bf16 tensor can merely be created (V100, T4), but cuDNN has no bf16 convolutions there."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)


def mps_bf16_ok() -> bool:
    # An autocast dtype that a torch does not support only warns and trains in fp32: hence the explicit test.
    return torch.__version__ >= (2, 6) and torch.backends.mps.is_macos_or_newer(14, 0)


def resolve_amp(mode: str, device: torch.device) -> AmpPolicy:
    """--amp -> the precision policy on this device: the one named, unless the device cannot do it (a UsageError);
    auto: what the device does best (_auto_amp)."""
    if mode not in AMP_MODES:
        raise UsageError(f"--amp {mode!r}: choose from {', '.join(AMP_MODES)}")
    if refusal := _amp_refusal(mode, device):
        raise UsageError(f"--amp {mode}: {refusal}")
    return _auto_amp(device) if mode == "auto" else {"off": FP32, "bf16": BF16, "fp16": FP16}[mode]


def _amp_refusal(mode: str, device: torch.device) -> str | None:
    if device.type == "cuda" and mode == "bf16" and not cuda_bf16_native(device):
        major, minor = torch.cuda.get_device_capability(device)
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bf16 convolutions "
                "(they need 8.0 or newer); use --amp fp16 or auto")
    if device.type == "mps" and mode == "bf16" and not mps_bf16_ok():
        return (f"bf16 on MPS needs torch 2.6 or newer and macOS 14 or newer (this is torch {torch.__version__}); "
                "use --amp auto or off")
    # fp16 needs loss scaling (small gradients underflow without it), which GradScaler gives on MPS from torch 2.8
    if device.type == "mps" and mode == "fp16" and torch.__version__ < (2, 8):
        return (f"fp16 on MPS needs loss scaling, which torch supports there from 2.8 (this is torch "
                f"{torch.__version__}); use --amp auto or off")
    if device.type not in ("cuda", "mps") and mode == "fp16":
        # loss scaling (GradScaler) is a GPU tool, and CPUs compute fp16 slower than fp32 or bf16
        return "for CUDA GPUs only; on the CPU use --amp bf16, auto or off"
    return None


def _auto_amp(device: torch.device) -> AmpPolicy:
    """bf16 where it is native (CUDA 8.0+, AVX512-BF16 or AMX), fp16 with loss scaling on CUDA 7.x, else fp32."""
    if device.type == "cuda":
        if cuda_bf16_native(device):
            return BF16
        # tensor cores from Volta (7.0) on; on Pascal and older fp16 gains little and risks overflow
        return FP16 if torch.cuda.get_device_capability(device) >= (7, 0) else FP32
    # MPS stays fp32: mixed precision there cannot be verified on this project's machines, and MPS has had
    # kernels that were silently wrong (CHANNELS_LAST_MPS_REASON)
    return BF16 if device.type == "cpu" and cpu_has_fast_bf16() else FP32


def autocast(device: torch.device, amp: AmpPolicy):
    """Autocast to the policy's dtype; fp32 enters none (torch.autocast raises for a device type it cannot
    autocast, even disabled)."""
    return torch.autocast(device.type, dtype=amp.dtype) if amp.dtype else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device and MPS


def process_memory_mb() -> dict:
    """Resident memory now and at its peak, in MiB."""
    current = None
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        current = next((int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:")), None)
    # ru_maxrss is in KiB on Linux but in bytes on macOS (getrusage(2) of each)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    return {"rss_mb": current, "peak_rss_mb": peak}


def device_report(device: torch.device) -> dict:
    """What test_model reports of the device: the GPU, its memory, versions and what --amp auto picks there."""
    if device.type == "cuda":
        props, (free, total) = torch.cuda.get_device_properties(device), torch.cuda.mem_get_info(device)
        return {"cuda_available": True, "name": props.name, "capability": f"{props.major}.{props.minor}",
                "total_memory_mb": total / 2**20, "free_memory_mb": free / 2**20, "cuda_version": torch.version.cuda,
                "cudnn_version": torch.backends.cudnn.version(), "bf16_supported": cuda_bf16_native(device),
                "amp_auto": resolve_amp("auto", device).name}
    if device.type != "mps":
        return {"cuda_available": torch.cuda.is_available()}
    # recommended_max_memory, get_name and get_core_count are not in every torch
    recommended = getattr(torch.mps, "recommended_max_memory", lambda: None)()
    return {"mps_available": True, "name": getattr(torch.backends.mps, "get_name", lambda: None)(),
            "gpu_cores": getattr(torch.backends.mps, "get_core_count", lambda: None)(),
            "macos": platform.mac_ver()[0] or "unknown", "torch_version": str(torch.__version__),
            "recommended_max_memory_mb": None if recommended is None else recommended / 2**20,
            "allocated_memory_mb": torch.mps.current_allocated_memory() / 2**20,
            "driver_memory_mb": torch.mps.driver_allocated_memory() / 2**20,
            "bf16_supported": mps_bf16_ok(), "amp_auto": resolve_amp("auto", device).name,
            "channels_last": channels_last_ok(device)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Fast: cuDNN benchmarks its kernels once (every batch has the same shape). Deterministic: the same kernels
    in the same order in full fp32 (no TF32), so that a resumed run repeats the uninterrupted one bit for bit."""
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    if deterministic:
        if device.type == "cuda":
            # cuBLAS is only deterministic with a fixed workspace; read when its handle is made
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for peak_gpu_mb (per run, per model)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":
        torch.mps.empty_cache()  # the driver's pool restarts from what live tensors hold
        with contextlib.suppress(Exception):  # as in peak_gpu_mb
            torch.accelerator.reset_peak_memory_stats(device)


def peak_gpu_mb(device: torch.device) -> float | None:
    """The most GPU memory tensors held since reset_peak_memory, in MiB; None on the CPU. On MPS: the allocator's
    peak where torch.accelerator keeps one, else the Metal driver's memory, its pool emptied by reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type != "mps":
        return None
    peak = None
    with contextlib.suppress(Exception):  # no torch.accelerator, or an MPS allocator without stats
        peak = torch.accelerator.memory_stats(device).get("allocated_bytes.all.peak")
    return (peak or torch.mps.driver_allocated_memory()) / 2**20


# torch's NotImplementedError for an op without an MPS kernel; the variable it suggests is read at import
_MPS_MISSING_OP = re.compile(r"(?:operator '([^']+)' )?is not currently implemented for the MPS device")


def mps_hint(exc: BaseException) -> str | None:
    """One line of advice for torch's NotImplementedError of an op without an MPS kernel, along the exception's
    causes; None for any other error."""
    found = (_MPS_MISSING_OP.search(str(e)) for e in chain(exc) if isinstance(e, NotImplementedError))
    if (match := next(filter(None, found), None)) is None:
        return None
    if os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK", "0").strip() not in ("", "0"):
        advice = "PYTORCH_ENABLE_MPS_FALLBACK=1 only takes effect when set before Python starts (export it)"
    else:
        advice = "set PYTORCH_ENABLE_MPS_FALLBACK=1 in the environment to run it on the CPU (slower)"
    op = match[1] or "an operator"
    return f"{op} is not implemented on MPS in torch {torch.__version__}: {advice}, or use --device cpu"
