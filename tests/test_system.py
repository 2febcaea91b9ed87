"""Device, precision and backend decisions, proven on the CPU with the torch.cuda, torch.backends.mps and
torch.mps queries, torch.__version__ and platform.mac_ver monkeypatched."""

import os
import re
import types
import warnings

import pytest
import torch

from fashion_ft import system
from fashion_ft.errors import UsageError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA machine: set .capability (and .count) to describe its GPUs."""
    fake = types.SimpleNamespace(capability=(8, 0), count=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: fake.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.version, "hip", None)

    def emulated_bf16_says_yes(including_emulation=True):
        raise AssertionError("is_bf16_supported() answers True on a V100 or T4: decide by capability")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_bf16_says_yes)
    return fake


@pytest.fixture
def no_gpu(monkeypatch):
    """No GPU at all, as on a Linux build of torch (whatever machine the tests run on: a Mac too)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(system, "nvidia_gpu_evidence", lambda: None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)


# ---------------------------------------------------------------- precision policy

# (device, capability, CPU has native bf16, --amp) -> policy name, or the error's flag
AMP_TABLE = [
    ("cpu", None, False, "off", "off"),
    ("cpu", None, True, "off", "off"),
    ("cpu", None, False, "bf16", "bf16"),
    ("cpu", None, False, "fp16", UsageError),
    ("cpu", None, True, "auto", "bf16"),
    ("cpu", None, False, "auto", "off"),
    ("cuda", (8, 0), False, "off", "off"),
    ("cuda", (8, 0), False, "bf16", "bf16"),
    ("cuda", (7, 0), False, "bf16", UsageError),
    ("cuda", (7, 5), False, "bf16", UsageError),
    ("cuda", (7, 0), False, "fp16", "fp16"),
    ("cuda", (6, 1), False, "fp16", "fp16"),
    ("cuda", (6, 0), True, "auto", "off"),  # Pascal: fp32, whatever the CPU can do
    ("cuda", (7, 0), False, "auto", "fp16"),  # V100
    ("cuda", (7, 5), False, "auto", "fp16"),  # T4
    ("cuda", (8, 0), False, "auto", "bf16"),  # A100
    ("cuda", (8, 6), False, "auto", "bf16"),
    ("cuda", (9, 0), False, "auto", "bf16"),  # H100
]


@pytest.mark.parametrize("device_type, capability, cpu_bf16, mode, expected", AMP_TABLE)
def test_amp_policy_per_device_and_capability(gpu, monkeypatch, device_type, capability, cpu_bf16, mode, expected):
    gpu.capability = capability
    monkeypatch.setattr(system, "cpu_has_fast_bf16", lambda: cpu_bf16)
    device = CUDA if device_type == "cuda" else CPU
    if expected is UsageError:
        with pytest.raises(UsageError, match=f"--amp {mode}"):
            system.resolve_amp(mode, device)
        return
    policy = system.resolve_amp(mode, device)
    assert policy.name == expected
    assert policy.use_scaler == (expected == "fp16")  # fp16 alone needs loss scaling
    assert policy.dtype == {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[expected]


def test_bf16_refusal_names_the_gpu_and_the_way_out(gpu):
    gpu.capability = (7, 0)
    with pytest.raises(UsageError) as err:
        system.resolve_amp("bf16", CUDA)
    assert "V100" in str(err.value) and "7.0" in str(err.value) and "--amp fp16 or auto" in str(err.value)


def test_unknown_amp_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="--amp 'fp8'"):
        system.resolve_amp("fp8", CPU)


def test_amp_modes_are_the_choices_of_test_model():
    import test_model

    action = next(a for a in test_model.get_args_parser()._actions if a.dest == "amp")
    assert tuple(action.choices) == system.AMP_MODES == ("auto", "bf16", "fp16", "off")


@pytest.mark.parametrize("capability, native", [((6, 1), False), ((7, 0), False), ((7, 5), False),
                                                ((8, 0), True), ((9, 0), True)])
def test_cuda_report_tells_real_bf16_support(gpu, monkeypatch, capability, native):
    gpu.capability = capability
    props = types.SimpleNamespace(name="GPU", major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**31))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    report = system.cuda_report(CUDA)
    assert report["bf16_supported"] is native
    assert report["capability"] == f"{capability[0]}.{capability[1]}"
    assert report["amp_auto"] == ("bf16" if native else "fp16" if capability >= (7, 0) else "off")


# ---------------------------------------------------------------- the CPU


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16

processor\t: 1
model name\t: something else
flags\t\t: fpu
"""


def test_cpu_info_reads_the_first_cpu(tmp_path):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    name, flags = system.cpu_info(str(tmp_path / "cpuinfo"))
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == {"fpu", "sse2", "avx512f", "avx512_bf16", "amx_bf16"}


def test_cpu_info_without_proc_falls_back_to_the_platform(tmp_path):
    name, flags = system.cpu_info(str(tmp_path / "missing"))
    assert name and flags == frozenset()


@pytest.mark.parametrize("flags, fast", [({"avx512_bf16"}, True), ({"amx_bf16"}, True), ({"avx512f", "avx2"}, False),
                                         (set(), False)])
def test_cpu_fast_bf16_from_the_flags(monkeypatch, flags, fast):
    monkeypatch.setattr(system, "cpu_info", lambda: ("cpu", frozenset(flags)))
    assert system.cpu_has_fast_bf16() is fast


# ---------------------------------------------------------------- which GPU


def test_auto_under_a_scheduler_that_shows_one_gpu_per_process(gpu, monkeypatch):
    # SLURM --gpus-per-task=1: each task sees only its own GPU, LOCAL_RANK still counts the tasks
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert system.resolve_device("auto", local_rank=3) == torch.device("cuda", 0)
    assert system.resolve_device("cuda", local_rank=1) == torch.device("cuda", 0)


@pytest.mark.parametrize("count, visible, spec, local_rank, message", [
    # torchrun --nproc_per_node=2 on a one-GPU machine: two ranks on one GPU
    (1, None, "auto", 1, "--device auto: LOCAL_RANK is 1 but only 1 CUDA device"),
    (1, None, "cuda", 1, "--device cuda: LOCAL_RANK is 1 but only 1 CUDA device"),
    (2, "0,1", "auto", 2, "LOCAL_RANK is 2 but only 2"),
    (1, None, "cuda:1", None, "--device cuda:1: only 1 CUDA device"),
    (2, None, "cuda:1", 0, "--device cuda:1: under torchrun every process uses the GPU of its LOCAL_RANK"),
])
def test_gpus_that_are_not_there_are_refused(gpu, monkeypatch, count, visible, spec, local_rank, message):
    gpu.count = count
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(UsageError, match=message):
        system.resolve_device(spec, local_rank)


@pytest.mark.parametrize("spec, local_rank, index", [("auto", None, 0), ("auto", 2, 2), ("cuda", 3, 3),
                                                     ("cuda:1", None, 1)])
def test_gpu_of_each_process(gpu, spec, local_rank, index):
    gpu.count = 4
    assert system.resolve_device(spec, local_rank) == torch.device("cuda", index)


def test_auto_without_a_gpu_warns_and_uses_the_cpu(no_gpu):
    with pytest.warns(UserWarning, match="no CUDA GPU found: running on the CPU"):
        assert system.resolve_device("auto") == CPU


@pytest.mark.parametrize("spec, message", [
    ("cuda", "--device cuda: CUDA is not available on this machine (use --device cpu or auto)"),
    ("meta", "--device 'meta': only cpu, cuda and mps are supported"),
])
def test_devices_that_cannot_be_used_are_refused(no_gpu, spec, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        system.resolve_device(spec)


# ---------------------------------------------------------------- an NVIDIA GPU that CUDA cannot use


def test_broken_cuda_is_explained(broken_cuda):
    reason = system.broken_cuda_reason()
    assert reason.startswith("an NVIDIA GPU is present (/dev/nvidia0) but CUDA does not work in torch")
    assert "driver on your system is too old" in reason and "\n" not in reason


def test_cpu_only_build_on_a_gpu_machine(broken_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU-only build" in system.broken_cuda_reason()


def test_no_nvidia_gpu_is_not_broken_cuda(no_gpu):
    assert system.broken_cuda_reason() is None


def test_broken_cuda_is_named_when_falling_back_or_refusing(broken_cuda):
    with pytest.warns(UserWarning, match="driver on your system is too old.*running on the CPU"):
        system.resolve_device("auto")
    with pytest.raises(UsageError, match="--device cuda: an NVIDIA GPU is present"):
        system.resolve_device("cuda")


def test_nvidia_gpu_evidence(tmp_path, monkeypatch):
    monkeypatch.setattr(system.shutil, "which", lambda name: None)
    assert system.nvidia_gpu_evidence(str(tmp_path / "nvidia0")) is None
    (tmp_path / "nvidia0").touch()
    assert system.nvidia_gpu_evidence(str(tmp_path / "nvidia0")) == str(tmp_path / "nvidia0")
    monkeypatch.setattr(system.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert system.nvidia_gpu_evidence(str(tmp_path / "none")) == "nvidia-smi"


# ---------------------------------------------------------------- backend flags and GPU memory


def backend_flags() -> dict:
    return {
        "benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }


@pytest.fixture
def restore_backends(monkeypatch):
    """The flags are process-wide: put them back for the tests that follow."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = backend_flags()
    yield saved
    torch.backends.cudnn.benchmark = saved["benchmark"]
    torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
    torch.use_deterministic_algorithms(saved["deterministic_algorithms"], warn_only=saved["warn_only"])
    torch.backends.cuda.matmul.allow_tf32 = saved["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = saved["cudnn_tf32"]
    assert backend_flags() == saved


@pytest.mark.parametrize("device", [CPU, CUDA, torch.device("mps", 0)], ids=["cpu", "cuda", "mps"])
def test_deterministic_backends(restore_backends, device):
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    system.configure_backends(device, deterministic=True)
    assert backend_flags() == {"benchmark": False, "cudnn_deterministic": True, "deterministic_algorithms": True,
                               "warn_only": False, "matmul_tf32": False, "cudnn_tf32": False}
    # cuBLAS needs a fixed workspace to be deterministic; the CPU has no cuBLAS
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == (":4096:8" if device.type == "cuda" else None)


def test_fast_backends_benchmark_cudnn_on_cuda_only(restore_backends):
    torch.backends.cudnn.benchmark = False
    system.configure_backends(CPU, deterministic=False)
    assert backend_flags() == restore_backends | {"benchmark": False}
    system.configure_backends(torch.device("mps", 0), deterministic=False)  # nothing to set on MPS
    assert backend_flags() == restore_backends | {"benchmark": False}
    system.configure_backends(CUDA, deterministic=False)
    assert torch.backends.cudnn.benchmark is True
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_still_runs_a_training_step_on_the_cpu(restore_backends):
    system.configure_backends(CPU, deterministic=True)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * 13 * 13, 10))
    model(torch.randn(8, 1, 28, 28)).logsumexp(1).mean().backward()


def test_peak_gpu_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20 + 2**19)
    system.reset_peak_memory(CPU)
    assert calls == [] and system.peak_gpu_mb(CPU) is None
    system.reset_peak_memory(CUDA)
    assert calls == [CUDA]
    assert system.peak_gpu_mb(CUDA) == 3.5


# ---------------------------------------------------------------- Apple MPS, on a pretend Mac

MPS = torch.device("mps", 0)


class PretendTorch(types.SimpleNamespace):
    """Setting .torch sets torch.__version__ (for this test only)."""

    def __init__(self, monkeypatch, **kw):
        super().__init__(_monkeypatch=monkeypatch)
        for name, value in kw.items():
            setattr(self, name, value)

    def __setattr__(self, name, value):
        if name == "torch":
            self._monkeypatch.setattr(torch, "__version__", value)
        super().__setattr__(name, value)


@pytest.fixture
def mac(monkeypatch):
    """A pretend Mac: set .torch (torch.__version__), .macos ('' off macOS), .mps ('yes', 'no' or
    'unbuilt') and .cuda (a CUDA GPU of capability 8.0)."""
    fake = PretendTorch(monkeypatch, torch="2.14.1", macos="15.3", mps="yes", cuda=False)
    monkeypatch.setattr(system.platform, "mac_ver", lambda: (fake.macos, ("", "", ""), ""))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: fake.mps == "yes")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: fake.mps != "unbuilt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: fake.cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if fake.cuda else 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(system, "nvidia_gpu_evidence", lambda: None)
    monkeypatch.setattr(system, "cpu_has_fast_bf16", lambda: False)
    return fake


def refused(pattern):
    return ("UsageError", pattern)


# (torch, macOS, MPS, CUDA, --device, --amp) -> (device, policy name) or the UsageError's text
MPS_TABLE = [
    # today's torch on a current Mac: auto is fp32; bf16 (no scaler) and fp16 only when asked for
    ("2.14.1", "15.3", "yes", False, "auto", "auto", "mps:0", "off"),
    ("2.14.1", "26.0", "yes", False, "mps", "auto", "mps:0", "off"),
    ("2.14.1", "15.3", "yes", False, "mps:0", "bf16", "mps:0", "bf16"),
    ("2.14.1", "15.3", "yes", False, "mps", "fp16", "mps:0", "fp16"),
    ("2.14.1", "15.3", "yes", False, "mps", "off", "mps:0", "off"),
    ("2.14.1", "15.3", "yes", False, "cpu", "auto", "cpu", "off"),  # the CPU rules, not MPS's
    ("2.14.1", "15.3", "yes", True, "auto", "auto", "cuda:0", "bf16"),  # CUDA comes first
    # bf16 needs macOS 14 (and torch 2.6); torch 2.8 still runs MPS on macOS 13, with GradScaler
    ("2.8.0", "14.0", "yes", False, "auto", "auto", "mps:0", "off"),
    ("2.8.0", "14.0", "yes", False, "mps", "bf16", "mps:0", "bf16"),
    ("2.8.0", "13.6", "yes", False, "auto", "auto", "mps:0", "off"),
    ("2.8.0", "13.6", "yes", False, "mps", "fp16", "mps:0", "fp16"),
    ("2.8.0", "13.6", "yes", False, "mps", "bf16", None, refused(r"--amp bf16: bf16 on MPS needs macOS 14 .*13\.6")),
    # no GradScaler on MPS before torch 2.8: fp16 only unscaled, so it is refused
    ("2.7.1", "14.5", "yes", False, "auto", "auto", "mps:0", "off"),
    ("2.7.1", "14.5", "yes", False, "mps", "bf16", "mps:0", "bf16"),
    ("2.7.1", "13.6", "yes", False, "auto", "auto", "mps:0", "off"),
    ("2.7.1", "13.6", "yes", False, "mps", "fp16", None, refused(r"--amp fp16: .*GradScaler supports MPS from torch 2\.8")),
    ("2.6.0", "14.5", "yes", False, "mps", "bf16", "mps:0", "bf16"),
    ("2.5.1", "14.5", "yes", False, "auto", "auto", "mps:0", "off"),
    ("2.5.1", "14.5", "yes", False, "mps", "bf16", None, refused(r"--amp bf16: bf16 autocast on MPS needs torch 2\.6")),
    ("2.5.1", "14.5", "yes", False, "mps", "fp16", None, refused(r"--amp fp16: .*GradScaler .*torch 2\.8")),
    # torch 2.4 (the oldest this project supports) has no MPS autocast at all
    ("2.4.1", "14.5", "yes", False, "auto", "auto", "mps:0", "off"),
    ("2.4.1", "14.5", "yes", False, "mps", "fp16", None, refused(r"--amp fp16: fp16 autocast on MPS needs torch 2\.5")),
    ("2.4.1", "14.5", "yes", False, "mps", "off", "mps:0", "off"),
    # no usable MPS: auto falls back to the CPU, an explicit mps is refused with the reason
    ("2.14.1", "15.3", "no", False, "auto", "auto", "cpu", "off"),
    ("2.14.1", "15.3", "no", False, "mps", "auto", None, refused(r"--device mps: torch .* finds no Metal GPU")),
    ("2.14.1", "13.6", "no", False, "mps", "auto", None,
     refused(r"--device mps: macOS 13\.6 is too old for MPS in torch 2\.14\.1 \(it needs macOS 14\.0 or newer\)")),
    ("2.8.0", "12.1", "no", False, "mps", "auto", None, refused(r"--device mps: macOS 12\.1 is too old .*12\.3")),
    ("2.14.1", "", "unbuilt", False, "mps", "auto", None, refused(r"--device mps: torch 2\.14\.1 is not built with MPS")),
    ("2.14.1", "15.3", "yes", False, "mps:1", "auto", None, refused(r"--device mps:1: there is one MPS device")),
    ("2.14.1", "15.3", "yes", False, "metal", "auto", None, refused(r"--device 'metal' is not a device .*mps")),
]


@pytest.mark.parametrize("torch_v, macos, mps, cuda, device_spec, amp, device, expected", MPS_TABLE)
def test_mps_device_and_amp(mac, torch_v, macos, mps, cuda, device_spec, amp, device, expected):
    mac.torch, mac.macos, mac.mps, mac.cuda = torch_v, macos, mps, cuda
    if isinstance(expected, tuple):
        with pytest.raises(UsageError, match=expected[1]) as err:
            system.resolve_amp(amp, system.resolve_device(device_spec))
        assert "\n" not in str(err.value)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU fallback's warning: tested below
        resolved = system.resolve_device(device_spec)
    assert str(resolved) == device
    policy = system.resolve_amp(amp, resolved)
    assert policy.name == expected
    assert policy.use_scaler == (expected == "fp16")  # fp16 is never chosen without loss scaling
    if resolved.type == "mps" and amp != "off":
        assert policy.reason  # says why; never compared
        assert policy == {"bf16": system.BF16, "fp16": system.FP16, "off": system.FP32}[expected]


@pytest.mark.parametrize("torch_v, macos", [("2.14.1", "15.3"), ("2.8.0", "13.6"), ("2.7.1", "13.6"), ("2.4.1", "14.5")])
def test_mps_auto_is_fp32_whatever_torch_and_macos_offer(mac, torch_v, macos):
    """Mixed precision on MPS cannot be verified here: auto never picks it, an explicit --amp still can."""
    mac.torch, mac.macos = torch_v, macos
    policy = system.resolve_amp("auto", MPS)
    assert policy == system.FP32 and policy.reason == system.MPS_AUTO_REASON
    assert "--amp bf16 or fp16" in policy.reason and "\n" not in policy.reason


def test_explicit_mps_policy_says_why(mac):
    assert "no loss scaling" in system.resolve_amp("bf16", MPS).reason
    assert "GradScaler" in system.resolve_amp("fp16", MPS).reason


def test_torch_version_is_compared_as_numbers(monkeypatch):
    for version, parsed in [("2.14.1+cu130", (2, 14)), ("2.8.0", (2, 8)), ("2.10.0.dev20260101", (2, 10))]:
        monkeypatch.setattr(torch, "__version__", version)
        assert system.torch_version() == parsed
    assert (2, 14) >= system.MPS_GRAD_SCALER_SINCE  # as strings, "2.14" < "2.8"


@pytest.mark.parametrize("release, parsed", [("14.5", (14, 5)), ("26.0.1", (26, 0, 1)), ("", None)])
def test_macos_version(monkeypatch, release, parsed):
    monkeypatch.setattr(system.platform, "mac_ver", lambda: (release, ("", "", ""), ""))
    assert system.macos_version() == parsed


def test_auto_on_a_mac_without_mps_says_why(mac):
    mac.mps, mac.macos = "no", "13.6"
    with pytest.warns(UserWarning, match=r"no CUDA GPU found, and macOS 13\.6 is too old for MPS .*: running on the CPU"):
        assert system.resolve_device("auto") == CPU


def test_auto_on_linux_torch_warns_as_before(mac):
    mac.mps, mac.macos = "unbuilt", ""
    with pytest.warns(UserWarning) as record:
        system.resolve_device("auto")
    assert [str(w.message) for w in record] == ["no CUDA GPU found: running on the CPU (--device auto)"]


def test_mps_is_not_chosen_without_a_reason(mac):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # picking MPS is not a fallback: no warning
        assert system.resolve_device("auto") == MPS


# ---------------------------------------------------------------- MPS under torchrun


def test_auto_under_torchrun_on_a_mac_uses_the_cpu(mac):
    with pytest.warns(UserWarning, match="torchrun is not supported on Apple MPS.*running on the CPU"):
        assert system.resolve_device("auto", local_rank=0) == CPU


def test_explicit_mps_under_torchrun_is_refused(mac):
    with pytest.raises(UsageError, match="--device mps: torchrun is not supported on Apple MPS"):
        system.resolve_device("mps", local_rank=0)


@pytest.mark.parametrize("device, world_size, launched, refuse", [
    (MPS, 2, True, True),
    (MPS, 8, False, True),
    (MPS, 1, True, True),  # torchrun with one process still runs DDP's collectives
    (MPS, 1, False, False),  # a plain single process
    (CPU, 4, True, False),
    (CUDA, 8, True, False),
])
def test_distributed_device_check(device, world_size, launched, refuse):
    if not refuse:
        system.check_distributed_device(device, world_size, launched)
        return
    with pytest.raises(UsageError) as err:
        system.check_distributed_device(device, world_size, launched)
    message = str(err.value)
    assert message.startswith("--device mps: torchrun is not supported on Apple MPS") and "\n" not in message
    assert "gloo" in message and "--device cpu" in message


# ---------------------------------------------------------------- channels_last, batch size, autocast


@pytest.mark.parametrize("device, ok", [(CPU, True), (CUDA, True), (MPS, False), (torch.device("mps"), False)])
def test_channels_last_is_off_on_mps(device, ok):
    assert system.channels_last_ok(device) is ok


def test_channels_last_reason_is_one_printable_line():
    reason = system.CHANNELS_LAST_MPS_REASON
    assert "\n" not in reason and "MPS" in reason and "BatchNorm" in reason and "channels_last" in reason


@pytest.mark.parametrize("device, size", [(CPU, 256), (CUDA, 1024), (MPS, 1024)])
def test_default_eval_batch_size(device, size):
    assert system.default_eval_batch_size(device) == size


def test_autocast_on_mps(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: calls.append((device_type, kw)) or "ctx")
    # off: no torch.autocast("mps") at all (torch < 2.5 raises for it even when disabled)
    with system.autocast(MPS, system.FP32):
        pass
    assert calls == []
    assert system.autocast(MPS, system.BF16) == "ctx"
    assert system.autocast(MPS, system.FP16) == "ctx"
    assert calls == [("mps", {"dtype": torch.bfloat16, "enabled": True}), ("mps", {"dtype": torch.float16, "enabled": True})]
    system.autocast(CPU, system.FP32)  # unchanged elsewhere: an explicitly disabled autocast
    assert calls[-1] == ("cpu", {"dtype": torch.float32, "enabled": False})


def test_synchronize_mps(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    system.synchronize(CPU)
    system.synchronize(MPS)
    assert calls == ["mps"]


@pytest.mark.parametrize("platform_name, maxrss, peak_mb", [("linux", 2048 * 1024, 2048.0), ("darwin", 2**30, 1024.0)])
def test_peak_rss_units(monkeypatch, platform_name, maxrss, peak_mb):
    monkeypatch.setattr(system.sys, "platform", platform_name)
    monkeypatch.setattr(system.resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    assert system.process_memory_mb()["peak_rss_mb"] == peak_mb


# ---------------------------------------------------------------- MPS memory


@pytest.fixture
def mps_memory(monkeypatch):
    """torch.mps's memory queries, and torch.accelerator's stats (.stats: a dict, or an exception)."""
    fake = types.SimpleNamespace(calls=[], driver=640 * 2**20, current=100 * 2**20, stats=RuntimeError("no stats"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: fake.calls.append("empty_cache"))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: fake.driver)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: fake.current)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: fake.calls.append("cuda"))

    def memory_stats(device=None):
        if isinstance(fake.stats, Exception):
            raise fake.stats
        return fake.stats

    def reset_peak(device=None):
        fake.calls.append("reset_peak")
        if isinstance(fake.stats, Exception):
            raise fake.stats

    monkeypatch.setattr(torch.accelerator, "memory_stats", memory_stats)
    monkeypatch.setattr(torch.accelerator, "reset_peak_memory_stats", reset_peak)
    return fake


# the allocator's peak where torch.accelerator has one, else the Metal driver's memory (640 MiB here)
@pytest.mark.parametrize("stats, peak_mb", [
    (RuntimeError("MPS doesn't support torch.accelerator memory API"), 640.0),
    (AttributeError("no torch.accelerator"), 640.0),
    ({}, 640.0),  # allocator not initialised
    ({"allocated_bytes.all.peak": 0}, 640.0),  # a stat the allocator does not keep
    ({"allocated_bytes.all.peak": 300 * 2**20}, 300.0),
])
def test_peak_memory_on_mps(mps_memory, stats, peak_mb):
    mps_memory.stats = stats
    system.reset_peak_memory(MPS)
    assert mps_memory.calls == ["empty_cache", "reset_peak"]  # never the CUDA reset
    assert system.peak_gpu_mb(MPS) == peak_mb


def test_reset_peak_memory_on_the_cpu_touches_no_gpu(mps_memory):
    system.reset_peak_memory(CPU)
    assert mps_memory.calls == []


def test_mps_report(mac, mps_memory, monkeypatch):
    mac.torch, mac.macos = "2.8.0", "13.6"
    monkeypatch.setattr(torch.backends.mps, "get_name", lambda: "Apple M2 Pro", raising=False)
    monkeypatch.setattr(torch.backends.mps, "get_core_count", lambda: 19, raising=False)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 21 * 2**30, raising=False)
    report = system.device_report(MPS)
    assert report == {"mps_available": True, "name": "Apple M2 Pro", "gpu_cores": 19, "macos": "13.6",
                      "torch_version": "2.8.0", "recommended_max_memory_mb": 21 * 1024.0,
                      "allocated_memory_mb": 100.0, "driver_memory_mb": 640.0, "bf16_supported": False,
                      "amp_auto": "off", "channels_last": False}
    assert system.mps_report(CPU) == {"mps_available": True}
    assert system.device_report(CPU) == {"cuda_available": False}  # cuda_report, as before


def test_mps_report_on_a_torch_without_the_newer_queries(mac, mps_memory, monkeypatch):
    for module, name in [(torch.backends.mps, "get_name"), (torch.backends.mps, "get_core_count"),
                         (torch.mps, "recommended_max_memory")]:
        monkeypatch.delattr(module, name, raising=False)
    report = system.mps_report(MPS)
    assert report["name"] is None and report["gpu_cores"] is None and report["recommended_max_memory_mb"] is None
    assert report["amp_auto"] == "off" and report["bf16_supported"] is True  # bf16 only when asked for


# ---------------------------------------------------------------- a missing MPS op


MISSING_OP = ("The operator 'aten::_ctc_loss' is not currently implemented for the MPS device. If you want this op "
              "to be considered for addition please comment on https://github.com/pytorch/pytorch/issues/141287 "
              "and mention use-case, that resulted in missing op as well as commit hash 5c48869. As a temporary "
              "fix, you can set the environment variable `PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU as a "
              "fallback for this op. WARNING: this will be slower than running natively on MPS.")


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("exc, op", [
    (NotImplementedError(MISSING_OP), "aten::_ctc_loss"),
    (NotImplementedError("The operator 'aten::foo' is not current implemented for the MPS device."), "aten::foo"),  # 2.0
    (NotImplementedError("Something is not currently implemented for the MPS device"), "an operator"),
    (chained(RuntimeError("validation failed"), NotImplementedError(MISSING_OP)), "aten::_ctc_loss"),
    (RuntimeError(MISSING_OP), None),  # not torch's NotImplementedError
    (NotImplementedError("not implemented for 'Half'"), None),
    (RuntimeError("CUDA out of memory"), None),
])
def test_mps_hint(monkeypatch, exc, op):
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    hint = system.mps_hint(exc)
    if op is None:
        assert hint is None
        return
    assert hint.startswith(f"{op} is not implemented on MPS in torch ") and "\n" not in hint
    assert "set PYTORCH_ENABLE_MPS_FALLBACK=1" in hint and "--device cpu" in hint


def test_mps_hint_when_the_fallback_was_set_too_late(monkeypatch):
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    hint = system.mps_hint(NotImplementedError(MISSING_OP))
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1 only takes effect when set before Python starts" in hint
    assert "\n" not in hint
