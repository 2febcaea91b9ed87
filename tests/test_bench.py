"""The benchmark of issue 4 in its --tiny mode, so that it cannot rot; and the GPU check's syntax.

The numbers of a tiny run on a shared CPU mean nothing, so only their presence and sign are checked.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fashion_ft.model import ARCHS

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_throughput.py"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, real_data_dir):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_prints_the_machine_and_settings(tiny_run):
    stdout, _ = tiny_run
    for line in ("cpu: ", "gpu: none", "torch ", "device cpu | amp ", "model: cnn3"):
        assert line in stdout, f"missing {line!r} in:\n{stdout}"


def test_throughputs_and_speedups_are_positive(tiny_run):
    stdout, _ = tiny_run
    rates = {m.group(1): number(m.group(2))
             for m in re.finditer(r"^(train original|train ours|eval original|eval ours):.*?([\d,]+) img/s",
                                  stdout, re.M)}
    assert set(rates) == {"train original", "train ours", "eval original", "eval ours"}, stdout
    assert all(v > 0 for v in rates.values()), rates
    for phase in ("train", "eval"):
        ratio = re.search(rf"^{phase} speed-up: ([\d.]+)x", stdout, re.M)
        assert ratio and number(ratio.group(1)) > 0, stdout


def cnn3_forward_mflop() -> float:
    """2 FLOP per multiply-add of the default cnn3: 3x3 convs at 28, 14 and 7 pixels, then the head."""
    kwargs = ARCHS["cnn3"].default_kwargs
    widths, macs = [1, *kwargs["channels"]], 0
    for i, side in enumerate((28, 14, 7)):
        macs += widths[i] * widths[i + 1] * 9 * side * side
    macs += widths[-1] * 3 * 3 * kwargs["hidden"] + kwargs["hidden"] * 10
    return 2 * macs / 1e6


def test_step_breakdown_and_flops(tiny_run):
    stdout, _ = tiny_run
    steps = re.findall(r"^step, .*?([\d.]+) ms", stdout, re.M)
    assert len(steps) == 3 and all(number(s) > 0 for s in steps), stdout
    overhead = re.search(r"^load \+ augment alone: ([\d.]+) ms per batch = ([\d.]+)% of a training step", stdout, re.M)
    assert overhead and number(overhead.group(1)) > 0 and number(overhead.group(2)) > 0, stdout
    flops = re.search(r"([\d.]+) MFLOP/image forward, ([\d.]+) MFLOP/image training", stdout)
    assert flops and number(flops.group(1)) == pytest.approx(cnn3_forward_mflop(), rel=0.02), stdout
    assert 2 < number(flops.group(2)) / number(flops.group(1)) < 3.2
    gflops = re.findall(r"(?:original|ours) ([\d.]+) GFLOP/s", stdout)
    assert len(gflops) == 4 and all(number(g) > 0 for g in gflops), stdout


def test_json_holds_the_same_numbers(tiny_run):
    _, data = tiny_run
    assert data["settings"]["tiny"] and data["settings"]["device"] == "cpu"
    assert data["summary"]["train_speedup"] > 0 and data["summary"]["eval_speedup"] > 0
    assert data["summary"]["targets"] == {}  # a tiny run judges no target
    for phase in ("training", "evaluation"):
        for path in ("original", "ours"):
            m = data[phase][path]
            assert m["images_per_s"] > 0 and len(m["seconds"]) == data["settings"]["repeats"]


def test_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
