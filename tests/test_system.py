"""Device, precision and backend decisions, proven on the CPU with the torch.cuda queries monkeypatched."""

import os
import types

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
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(system, "nvidia_gpu_evidence", lambda: None)


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


def test_more_processes_than_gpus_is_refused(gpu, monkeypatch):
    # torchrun --nproc_per_node=2 on a one-GPU machine: two ranks on one GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for spec in ("auto", "cuda"):
        with pytest.raises(UsageError, match=f"--device {spec}: LOCAL_RANK is 1 but only 1 CUDA device"):
            system.resolve_device(spec, local_rank=1)


def test_local_rank_beyond_several_visible_gpus_is_refused(gpu, monkeypatch):
    gpu.count = 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UsageError, match="LOCAL_RANK is 2 but only 2"):
        system.resolve_device("auto", local_rank=2)


@pytest.mark.parametrize("spec, local_rank, index", [("auto", None, 0), ("auto", 2, 2), ("cuda", 3, 3),
                                                     ("cuda:1", None, 1)])
def test_gpu_of_each_process(gpu, spec, local_rank, index):
    gpu.count = 4
    assert system.resolve_device(spec, local_rank) == torch.device("cuda", index)


def test_explicit_index_out_of_range(gpu):
    with pytest.raises(UsageError, match="--device cuda:1: only 1 CUDA device"):
        system.resolve_device("cuda:1")


def test_auto_without_a_gpu_warns_and_uses_the_cpu(no_gpu):
    with pytest.warns(UserWarning, match="no CUDA GPU found: running on the CPU"):
        assert system.resolve_device("auto") == CPU


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


@pytest.mark.parametrize("device", [CPU, CUDA], ids=["cpu", "cuda"])
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
