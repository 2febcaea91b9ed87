"""The throughput benchmark run as a user runs it (`python -m bench.bench_throughput --tiny`), and its FLOP count.
A tiny run's numbers on a shared CPU mean nothing: only their presence, sign and consistency are checked."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY, tiny_model
from foreign import MARKER, SPECS, write_script

from bench.bench_throughput import flops_per_image, main, print_table
from bench.own_model import compare
from fashion_ft.checkpoint import make_checkpoint
from fashion_ft.model import ARCHS, build_model, count_parameters

MEASUREMENTS = ["train_original", "train_ours", "eval_original", "eval_ours",
                "step_augment", "step_no_augment", "step_fixed_batch", "load_augment"]


def bench(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.bench_throughput", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def tiny_run(request, tmp_path_factory, real_data_dir):
    """(arch, stdout, the JSON) of one tiny run per registered arch, with two DataLoader workers and a teacher."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench("--tiny", "--device", "cpu", "--workers", "2", "--arch", request.param, "--json", out,
                   "--teacher", REPO / "model" / "resnet20.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, result.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_json_holds_the_speedups_and_the_facts(tiny_run):
    arch, _, r = tiny_run
    assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["machine"]["gpu"] is None
    assert r["settings"]["tiny"] and r["settings"]["workers"] == 2 and r["data"] == {"train": 512, "test": 256}
    assert r["model"]["arch"] == arch
    assert r["model"]["parameters"] == count_parameters(build_model(arch))[0]
    assert r["model"]["flops_per_image"] == pytest.approx(flops_per_image(build_model(arch)))
    rows = r["measurements"]
    matmuls = [name for name in rows if name.startswith("matmul_")]
    assert list(rows) == MEASUREMENTS + matmuls + ["step_teachers"]
    assert "with 1 teacher(s)" in rows["step_teachers"]["label"]
    assert list(r["matmul_share_pct"]) == [n.removeprefix("matmul_") for n in matmuls]
    for name, row in rows.items():
        assert row["images_per_s"] > 0 and row["step_ms"] > 0, name
        assert len(row["seconds"]) == r["settings"]["repeats"], name
        assert (row["gflop_per_s"] is None) == (name == "load_augment"), name
    assert matmuls in (["matmul_fp32"], ["matmul_fp32", f"matmul_{r['settings']['amp']}"])


@pytest.mark.slow
def test_ratios_follow_from_the_medians(tiny_run):
    _, _, r = tiny_run
    rows = r["measurements"]
    rate = {name: row["images_per_s"] for name, row in rows.items()}
    assert r["train_speedup"] == pytest.approx(rate["train_ours"] / rate["train_original"])
    assert r["eval_speedup"] == pytest.approx(rate["eval_ours"] / rate["eval_original"])
    assert r["pipeline_pct"] == pytest.approx(100 * rows["load_augment"]["step_ms"] / rows["step_augment"]["step_ms"])
    assert 0 < r["pipeline_pct"] < 100
    assert r["matmul_share_pct"]["fp32"] == pytest.approx(
        100 * rows["train_ours"]["gflop_per_s"] / rows["matmul_fp32"]["gflop_per_s"])
    assert rows["matmul_fp32"]["gflop_per_s"] == pytest.approx(2 * 1024**3 * rate["matmul_fp32"] / 1e9)
    forward = r["model"]["flops_per_image"]["forward"]
    assert rows["eval_ours"]["gflop_per_s"] == pytest.approx(forward * rate["eval_ours"] / 1e9)
    plain, taught = rows["step_augment"]["step_ms"], rows["step_teachers"]["step_ms"]
    assert r["teachers_cost_pct"] == pytest.approx(100 * (taught - plain) / plain)


@pytest.mark.slow
def test_the_printed_table_is_the_json_printed(tiny_run, capsys):
    _, stdout, r = tiny_run
    print_table(r)
    assert stdout == capsys.readouterr().out
    lines = stdout.splitlines()
    header = lines.index("| measurement | images/s | ms per batch | GFLOP/s |")
    assert [line.split(" | ")[0] for line in lines[header + 2: header + 2 + len(r["measurements"])]] == \
        [f"| {row['label']}" for row in r["measurements"].values()]
    assert "TINY: a smoke run, not a measurement" in stdout and f"train speed-up: {r['train_speedup']:.2f}x" in stdout
    assert f"the teachers add {r['teachers_cost_pct']:+.1f}% to a training step" in stdout


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_training_step_counts_about_three_forwards(arch):
    """The backward costs about twice the forward (test_resnet checks a forward's count against a hand count)."""
    flops = flops_per_image(build_model(arch))
    assert flops["forward"] > 0 and 2 < flops["train"] / flops["forward"] < 3.2


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "must be positive"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--arch", "resnet50"], "--arch: invalid choice"),
    (["--json", "/nonexistent/folder/bench.json"], "--json /nonexistent/folder/bench.json: its folder does not exist"),
    (["--device", "tpu"], "error: --device 'tpu'"),
])
def test_bad_input_is_a_usage_error_before_any_work(args, message, capsys):
    try:
        result = main(args)
    except SystemExit as exc:  # argparse's own errors
        result = exc.code
    err = capsys.readouterr().err
    assert result == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err


@pytest.mark.slow  # a new interpreter importing torch: seconds on a busy machine
def test_missing_data_is_one_line_from_the_module(tmp_path):
    result = bench("--device", "cpu", "--data-dir", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: Fashion-MNIST train files not found") and result.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["a", "d"])
def test_a_users_own_network(tmp_path, real_data_dir, name):
    """--model-def: both paths train the user's class; (d) flattens with .view, so ours runs in NCHW and says so."""
    spec = SPECS[name]
    out = tmp_path / "bench.json"
    definition = f"{write_script(name, tmp_path)}:{spec.cls}"
    result = bench("--tiny", "--device", "cpu", "--workers", "0", "--model-def", definition, "--model-kwargs",
                   json.dumps(spec.kwargs), "--normalize", spec.mean, spec.std, "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["model"]["arch"] == definition and r["settings"]["channels_last"] == (name != "d")
    assert ("channels_last is off, the model runs in NCHW" in result.stderr) == (name == "d")
    assert r["train_speedup"] > 0 and not (tmp_path / MARKER).exists()
    assert r["teachers_cost_pct"] is None and "step_teachers" not in r["measurements"]  # no --teacher, no row


@pytest.mark.parametrize("recorded,models,used", [
    (True, 1, (0.5, 0.5)),  # one model: --normalize is what runs, as in test_model.py
    (False, 1, (0.5, 0.5)),
    (True, 2, (0.0, 1.0)),  # in a set, a file's own record wins
    (False, 2, (0.5, 0.5)),
])
def test_compare_applies_normalize_as_test_model_does(tmp_path, small_data_dir, monkeypatch, capsys,
                                                      recorded, models, used):
    model = tiny_model()
    ckpt = make_checkpoint(model, "cnn3", TINY, normalize=(0.0, 1.0)) if recorded else model.state_dict()
    paths = [tmp_path / f"m{i}.pt" for i in range(models)]
    for path in paths:
        torch.save(ckpt, path)
    seen = []

    def predict(model, images, rt, batch):
        seen.append((rt.mean, rt.std))
        return torch.zeros(len(images), 10)

    monkeypatch.setattr(compare, "predict_logits", predict)
    argv = [*map(str, paths), "--data-dir", str(small_data_dir), "--normalize", "0.5", "0.5"]
    if not recorded:
        argv += ["--model-kwargs", json.dumps(TINY)]
    assert compare.main(argv) == 0
    assert seen == [used] * models
    out = capsys.readouterr().out
    assert all(f"| {path} | " in out for path in paths)


@pytest.mark.parametrize("gained, lost, expected", [
    (0, 0, "the same predictions"),
    (5, 2, "+5 / -2 images, p = 0.453"),  # 2 * (1 + 7 + 21) / 2**7
    (30, 10, "+30 / -10 images, p = 0.002"),
    (10, 10, "+10 / -10 images, p = 1.000"),
])
def test_mcnemar_counts_the_images_only_one_model_gets_right(gained, lost, expected):
    both = 50
    first = torch.tensor([True] * both + [False] * gained + [True] * lost + [False] * 7)
    other = torch.tensor([True] * both + [True] * gained + [False] * lost + [False] * 7)
    assert compare.mcnemar(first, other) == expected
