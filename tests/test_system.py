"""Device, precision and backend decisions, proven on the CPU with the torch.cuda, torch.backends.mps and
torch.mps queries and torch.__version__ monkeypatched."""

import os
import re
import types
import warnings
from unittest import mock

import pytest
import torch
from conftest import caused
from torch.torch_version import TorchVersion

from fashion_ft import system
from fashion_ft.errors import UsageError

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps", 0)


@pytest.fixture
def machine(monkeypatch):
    """machine(...): `cuda` GPUs of `capability`, MPS 'yes', 'no' (built, not usable) or 'unbuilt' (a Linux torch)
    on macOS `macos`, this torch release, a CPU with or without bf16, CUDA_VISIBLE_DEVICES `visible`."""

    def pretend(cuda=0, capability=(8, 0), mps="unbuilt", macos=(15, 3), torch_version="2.14.1", cpu_bf16=False,
                visible=None):
        if visible:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        monkeypatch.setattr(torch, "__version__", TorchVersion(torch_version))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
        props = types.SimpleNamespace(name="GPU", major=capability[0], minor=capability[1])
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**31))
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)  # torch's checks the GPU's capability
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("True on a V100"))
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps == "yes")
        monkeypatch.setattr(torch.backends.mps, "is_built", lambda: mps != "unbuilt")
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos >= (major, minor))
        monkeypatch.setattr(system, "nvidia_gpu_evidence", lambda: None)
        monkeypatch.setattr(system, "cpu_has_fast_bf16", lambda: cpu_bf16)

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return pretend


def check(decision, expected: str, value, warning: str | None = None):
    """The decision gives value(expected), or, where expected starts with "--", a one-line UsageError that it
    matches; it warns once, matching `warning`, or not at all."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            got = decision()
        except UsageError as exc:
            got = str(exc)
    assert (re.match(expected, got) and "\n" not in got) if expected.startswith("--") else got == value(expected), got
    messages = [str(w.message) for w in record]
    assert len(messages) == (warning is not None) and all(re.match(warning, m) for m in messages), messages


# ---------------------------------------------------------------- precision policy

POLICIES = {"off": system.FP32, "bf16": system.BF16, "fp16": system.FP16}  # fp16 alone with loss scaling

# (machine, --device, --amp) -> the policy's name, or (a pattern of) the UsageError
AMP_TABLE = [
    (dict(), "cpu", "off", "off"),
    (dict(), "cpu", "bf16", "bf16"),
    (dict(), "cpu", "fp16", "--amp fp16: for CUDA GPUs only"),
    (dict(cpu_bf16=True), "cpu", "auto", "bf16"),  # AVX512-BF16 or AMX
    (dict(), "cpu", "auto", "off"),
    (dict(), "cpu", "fp8", "--amp 'fp8': choose from auto, bf16, fp16, off"),
    (dict(cuda=1), "cuda", "bf16", "bf16"),
    (dict(cuda=1, capability=(7, 0)), "cuda", "bf16", r"--amp bf16: Tesla V100.* 7\.0\).*--amp fp16 or auto"),
    (dict(cuda=1, capability=(6, 1)), "cuda", "fp16", "fp16"),
    (dict(cuda=1, capability=(6, 0), cpu_bf16=True), "cuda", "auto", "off"),  # Pascal: fp32, whatever the CPU does
    (dict(cuda=1, capability=(7, 0)), "cuda", "auto", "fp16"),  # V100
    (dict(cuda=1, capability=(7, 5)), "cuda", "auto", "fp16"),  # T4
    (dict(cuda=1, capability=(8, 0)), "cuda", "auto", "bf16"),  # A100
    (dict(cuda=1, capability=(9, 0)), "cuda", "auto", "bf16"),  # H100
    # Apple MPS: auto is fp32 whatever macOS offers; bf16 (macOS 14+) and fp16 (always with a scaler) when asked
    (dict(mps="yes"), "auto", "auto", "off"),
    (dict(mps="yes"), "mps:0", "bf16", "bf16"),
    (dict(mps="yes"), "mps", "fp16", "fp16"),
    (dict(mps="yes"), "mps", "off", "off"),
    (dict(mps="yes"), "cpu", "auto", "off"),  # the CPU's rules, not MPS's
    (dict(mps="yes", cuda=1), "auto", "auto", "bf16"),  # CUDA comes first
    (dict(mps="yes", macos=(14, 0)), "mps", "bf16", "bf16"),
    (dict(mps="yes", macos=(13, 6)), "mps", "bf16", "--amp bf16: bf16 on MPS needs .*macOS 14"),
    (dict(mps="yes", torch_version="2.5.1", macos=(14, 5)), "mps", "bf16", r"--amp bf16: bf16 on MPS needs torch 2\.6"),
    (dict(mps="yes", torch_version="2.7.1", macos=(14, 5)), "mps", "fp16", r"--amp fp16: .*loss scaling.* 2\.8"),
    (dict(mps="yes", torch_version="2.4.1", macos=(14, 5)), "mps", "auto", "off"),  # no MPS autocast at all
    (dict(mps="yes", macos=(13, 6)), "mps", "fp16", "fp16"),
]


@pytest.mark.parametrize("pretend, spec, mode, expected", AMP_TABLE)
def test_amp_policy(machine, pretend, spec, mode, expected):
    machine(**pretend)
    check(lambda: system.resolve_amp(mode, system.resolve_device(spec)), expected, POLICIES.get)


@pytest.mark.parametrize("capability, native", [((6, 1), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_report_tells_real_bf16_support(machine, capability, native):
    machine(cuda=1, capability=capability)
    report = system.device_report(CUDA)
    assert report["bf16_supported"] is native and report["capability"] == f"{capability[0]}.{capability[1]}"
    assert report["amp_auto"] == ("bf16" if native else "fp16" if capability >= (7, 0) else "off")


CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: {flags}

processor\t: 1
model name\t: something else
flags\t\t: fpu avx512_bf16
"""


@pytest.mark.parametrize("flags, fast", [("fpu avx512_bf16", True), ("amx_bf16", True), ("avx512f avx2", False)])
def test_cpu_info_reads_the_first_cpu_whose_flags_tell_fast_bf16(tmp_path, monkeypatch, flags, fast):
    (tmp_path / "cpuinfo").write_text(CPUINFO.format(flags=flags))
    info = system.cpu_info(str(tmp_path / "cpuinfo"))
    assert info == ("Intel(R) Xeon(R) Platinum 8480+", frozenset(flags.split()))
    name, no_flags = system.cpu_info(str(tmp_path / "missing"))  # no /proc: the platform's name
    assert name and no_flags == frozenset()
    monkeypatch.setattr(system, "cpu_info", lambda: info)
    assert system.cpu_has_fast_bf16() is fast


# ---------------------------------------------------------------- which device

# (machine, --device, LOCAL_RANK) -> the device, or (a pattern of) the UsageError; the one warning (None: none)
DEVICE_TABLE = [
    (dict(cuda=4), "auto", None, "cuda:0", None),
    (dict(cuda=4), "auto", 2, "cuda:2", None),
    (dict(cuda=4), "cuda", 3, "cuda:3", None),
    (dict(cuda=4), "cuda:1", None, "cuda:1", None),
    # SLURM --gpus-per-task=1: each task sees its own GPU as cuda:0, LOCAL_RANK still counts the tasks
    (dict(cuda=1, visible="3"), "auto", 3, "cuda:0", None),
    (dict(cuda=1, visible="3"), "cuda", 1, "cuda:0", None),
    # torchrun --nproc_per_node=2 on a one-GPU machine: two ranks on one GPU
    (dict(cuda=1), "auto", 1, "--device auto: LOCAL_RANK is 1 but only 1 CUDA device", None),
    (dict(cuda=1), "cuda", 1, "--device cuda: LOCAL_RANK is 1 but only 1 CUDA device", None),
    (dict(cuda=2, visible="0,1"), "auto", 2, "--device auto: LOCAL_RANK is 2 but only 2", None),
    (dict(cuda=1), "cuda:1", None, "--device cuda:1: only 1 CUDA device", None),
    (dict(cuda=2), "cuda:1", 0, "--device cuda:1: under torchrun each process uses its LOCAL_RANK's GPU", None),
    (dict(), "cuda", None, r"--device cuda: CUDA is not available on this machine \(use --device cpu or auto\)", None),
    (dict(), "meta", None, "--device 'meta': only cpu, cuda and mps are supported", None),
    (dict(), "metal", None, "--device 'metal' is not a device .*mps", None),
    (dict(mps="yes"), "mps", None, "mps:0", None),
    (dict(mps="yes"), "mps:1", None, r"--device mps:1: there is one MPS device", None),
    (dict(mps="no"), "mps", None, r"--device mps: torch 2\.14\.1 finds no Apple GPU.*\(use --device cpu or auto\)",
     None),
    (dict(), "mps", None, r"--device mps: torch 2\.14\.1 is not built with MPS", None),
    # DDP runs collectives even with one process, and no backend takes MPS tensors
    (dict(mps="yes"), "mps", 0, "--device mps: torchrun is not supported on Apple MPS: .*gloo.*--device cpu", None),
    # auto without CUDA: MPS, or the CPU with the one warning that says why
    (dict(), "auto", None, "cpu", re.escape("no CUDA GPU found: running on the CPU (--device auto)")),  # Linux torch
    (dict(mps="no"), "auto", None, "cpu",
     r"no CUDA GPU found, and torch 2\.14\.1 finds no Apple GPU .*: running on the CPU"),
    (dict(mps="yes"), "auto", None, "mps:0", None),
    (dict(mps="yes"), "auto", 0, "cpu", "torchrun is not supported on Apple MPS: .*: running on the CPU"),
]


@pytest.mark.parametrize("pretend, spec, local_rank, expected, warning", DEVICE_TABLE)
def test_device(machine, pretend, spec, local_rank, expected, warning):
    machine(**pretend)
    check(lambda: system.resolve_device(spec, local_rank), expected, torch.device, warning)


# ---------------------------------------------------------------- an NVIDIA GPU that CUDA cannot use


def test_broken_cuda_is_explained_and_named_when_falling_back_or_refusing(broken_cuda, monkeypatch):
    reason = system.broken_cuda_reason()
    assert reason.startswith("an NVIDIA GPU is present (/dev/nvidia0) but CUDA does not work in torch")
    assert "driver on your system is too old" in reason and "\n" not in reason
    with pytest.warns(UserWarning, match="driver on your system is too old.*running on the CPU"):
        system.resolve_device("auto")
    with pytest.raises(UsageError, match="--device cuda: an NVIDIA GPU is present"):
        system.resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU-only build" in system.broken_cuda_reason()
    monkeypatch.setattr(system, "nvidia_gpu_evidence", lambda: None)
    assert system.broken_cuda_reason() is None


def test_nvidia_gpu_evidence(tmp_path, monkeypatch):
    monkeypatch.setattr(system.shutil, "which", {"nvidia-smi": "/usr/bin/nvidia-smi"}.get)
    assert system.nvidia_gpu_evidence(str(tmp_path / "nvidia0")) == "nvidia-smi"
    monkeypatch.setattr(system.shutil, "which", lambda name: None)
    assert system.nvidia_gpu_evidence(str(tmp_path / "nvidia0")) is None
    (tmp_path / "nvidia0").touch()
    assert system.nvidia_gpu_evidence(str(tmp_path / "nvidia0")) == str(tmp_path / "nvidia0")


def backend_state() -> tuple:
    """cuDNN's benchmark, deterministic and TF32 flags, matmul's TF32, deterministic algorithms, their warn-only."""
    cudnn = torch.backends.cudnn
    return (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("device", [CPU, CUDA, MPS], ids=["cpu", "cuda", "mps"])
def test_backend_flags(monkeypatch, device, deterministic):
    """Deterministic: no benchmark, no TF32, deterministic algorithms; fast: cuDNN benchmarks on CUDA only."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    for module, name in [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "deterministic"),
                         (torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]:
        monkeypatch.setattr(module, name, name != "deterministic")  # all fast; put back after the test
    before = backend_state()
    try:
        system.configure_backends(device, deterministic)
        after = backend_state()
        if device == CPU:  # and the CPU still trains
            model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.MaxPool2d(2))
            model(torch.randn(8, 1, 28, 28)).logsumexp(1).mean().backward()
    finally:
        torch.use_deterministic_algorithms(before[4], warn_only=before[5])
    assert after == ((False, True, False, False, True, False) if deterministic else (device == CUDA, *before[1:]))
    # cuBLAS needs a fixed workspace to be deterministic; the CPU has no cuBLAS
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if deterministic and device == CUDA else None)


@pytest.mark.parametrize("device, channels_last, eval_batch", [(CPU, True, 256), (CUDA, True, 1024), (MPS, False, 1024),
                                                               (torch.device("mps"), False, 1024)])
def test_each_device_types_layout_eval_batch_autocast_and_sync(monkeypatch, device, channels_last, eval_batch):
    """channels_last off on MPS, GPUs evaluate large batches, autocast only for mixed precision."""
    assert system.channels_last_ok(device) is channels_last
    assert system.default_eval_batch_size(device) == eval_batch
    assert "\n" not in system.CHANNELS_LAST_MPS_REASON and "BatchNorm" in system.CHANNELS_LAST_MPS_REASON
    calls = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: calls.append((device_type, kw)) or "ctx")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    with system.autocast(device, system.FP32):  # none at all: a torch without MPS autocast raises even disabled
        system.synchronize(device)
    assert system.autocast(device, system.BF16) == system.autocast(device, system.FP16) == "ctx"
    assert calls == [*{"cpu": [], "cuda": ["cuda"], "mps": ["mps"]}[device.type],
                     (device.type, {"dtype": torch.bfloat16}), (device.type, {"dtype": torch.float16})]


@pytest.mark.parametrize("platform_name, maxrss, peak_mb", [("linux", 2048 * 1024, 2048.0), ("darwin", 2**30, 1024.0)])
def test_peak_rss_units(monkeypatch, platform_name, maxrss, peak_mb):
    monkeypatch.setattr(system.sys, "platform", platform_name)
    monkeypatch.setattr(system.resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    assert system.process_memory_mb()["peak_rss_mb"] == peak_mb


# MPS: the allocator's peak where torch.accelerator has one, else the Metal driver's memory (640 MiB here)
@pytest.mark.parametrize("device, stats, calls, peak_mb", [
    (CPU, None, [], None),
    (CUDA, None, ["cuda"], 3.5),
    (MPS, RuntimeError("MPS doesn't support torch.accelerator memory API"), ["empty_cache", "reset_peak"], 640.0),
    (MPS, {}, ["empty_cache", "reset_peak"], 640.0),  # allocator not initialised
    (MPS, {"allocated_bytes.all.peak": 0}, ["empty_cache", "reset_peak"], 640.0),  # a stat it does not keep
    (MPS, {"allocated_bytes.all.peak": 300 * 2**20}, ["empty_cache", "reset_peak"], 300.0),
])
def test_peak_gpu_memory(monkeypatch, device, stats, calls, peak_mb):
    """torch.accelerator's memory_stats returns `stats`, or raises it; `calls`: the resets asked for, in order."""
    asked, memory_stats = [], mock.Mock(side_effect=[stats] * 2)
    monkeypatch.setattr(torch.accelerator, "memory_stats", memory_stats)
    monkeypatch.setattr(torch.accelerator, "reset_peak_memory_stats",
                        lambda device=None: asked.append("reset_peak") or memory_stats())
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: asked.append("empty_cache"))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 640 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: asked.append("cuda"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3.5 * 2**20)
    system.reset_peak_memory(device)
    assert asked == calls and system.peak_gpu_mb(device) == peak_mb


def test_mps_report(machine, monkeypatch):
    machine(mps="yes", torch_version="2.8.0", macos=(13, 6))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 640 * 2**20)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 100 * 2**20)
    monkeypatch.setattr(system.platform, "mac_ver", lambda: ("13.6", ("", "", ""), ""))
    for module, name in [(torch.backends.mps, "get_name"), (torch.backends.mps, "get_core_count"),
                         (torch.mps, "recommended_max_memory")]:
        monkeypatch.delattr(module, name, raising=False)  # not in every torch
    assert system.device_report(MPS) == {
        "mps_available": True, "name": None, "gpu_cores": None, "recommended_max_memory_mb": None, "macos": "13.6",
        "torch_version": "2.8.0", "allocated_memory_mb": 100.0, "driver_memory_mb": 640.0, "bf16_supported": False,
        "amp_auto": "off", "channels_last": False}
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 2**34, raising=False)
    assert system.device_report(MPS)["recommended_max_memory_mb"] == 16384.0
    assert system.device_report(CPU) == {"cuda_available": False}


MISSING_OP = ("The operator 'aten::_ctc_loss' is not currently implemented for the MPS device. [...] As a temporary "
              "fix, you can set the environment variable `PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU as a fallback")


@pytest.mark.parametrize("exc, fallback, hint", [
    (NotImplementedError(MISSING_OP), None, "aten::_ctc_loss .*: set PYTORCH_ENABLE_MPS_FALLBACK=1 .* --device cpu"),
    (NotImplementedError("Something is not currently implemented for the MPS device"), None, "an operator "),
    (caused(RuntimeError("validation failed"), NotImplementedError(MISSING_OP)), None, "aten::_ctc_loss "),
    (caused(loop := RuntimeError("a chain that loops"), caused(NotImplementedError("no"), loop)), None, None),
    (NotImplementedError(MISSING_OP), "1", "aten::_ctc_loss .*: PYTORCH_ENABLE_MPS_FALLBACK=1 only takes effect "
                                           "when set before Python starts .*, or use --device cpu"),
    (RuntimeError(MISSING_OP), None, None),  # not torch's NotImplementedError
    (NotImplementedError("not implemented for 'Half'"), None, None),
    (RuntimeError("CUDA out of memory"), None, None),
])
def test_mps_hint(monkeypatch, exc, fallback, hint):
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    if fallback:
        monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", fallback)
    found = system.mps_hint(exc)
    assert found is None if hint is None else (re.match(hint, found) and "\n" not in found), found
