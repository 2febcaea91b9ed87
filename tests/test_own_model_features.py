"""Every feature of the two scripts on the user's own network (a) of tests/foreign.py: a BatchNorm CNN with a
BatchNorm1d head and log_softmax, MNIST's normalisation, a bare state_dict from a hyphenated script."""

import json

import pytest
import torch
from conftest import SMALL_RUN, run_script
from test_distributed import torchrun

import finetune_gpu

pytestmark = pytest.mark.slow


def own(net, out, *extra):
    """finetune_gpu.py's argv for network `net` into folder `out`."""
    return ["--model-path", net.weights, "--model-def", f"{net.file}:{net.cls}", "--model-kwargs",
            json.dumps(net.kwargs), "--normalize", net.mean, net.std, "--output", out / "best.pt", *extra]


def common(small_data_dir, tmp_path, *extra):
    return ["--data-dir", small_data_dir, "--logdir", tmp_path / "tb", *SMALL_RUN, "--limit-train", 512, *extra]


def main(argv) -> int:
    return finetune_gpu.main([str(a) for a in argv])


def load(path):
    return torch.load(path, weights_only=True)


def test_ema_flip_tta_tensorboard_and_never_worse(foreign_nets, small_data_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net, out = foreign_nets("a"), tmp_path / "run"
    argv = own(net, out, "--ema-decay", 0.9, "--tta", "flip", "--run-name", "own", "--epochs", 1)  # best: 0 or last
    assert main(argv + common(small_data_dir, tmp_path)) == 0, capsys.readouterr().err
    best, last = load(out / "best.pt"), load(out / "last.pt")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_val_acc"] >= metrics["base_val_acc"]  # epoch 0, the user's model, is a candidate
    if metrics["best_epoch"]:  # the moving average is what was validated and saved
        averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
        assert all(torch.equal(best["model"][k], averaged[k]) for k in best["model"])
    else:
        plain = load(net.weights)
        assert all(torch.equal(best["model"][k], plain[k]) for k in plain)
    check = run_script("test_model.py", "--model-path", out / "best.pt", "--model-def", f"{net.file}:{net.cls}",
                       "--data-dir", small_data_dir, "--full", "--json", "--tta", "flip", "--device", "cpu")
    quick = next(c for c in json.loads(check.stdout)["checks"] if c["name"] == "quick eval")["data"]
    assert check.returncode == 0 and quick["accuracy"] == pytest.approx(metrics["test_acc"], abs=1e-6)
    events = EventAccumulator(str(tmp_path / "tb" / "own")).Reload()
    assert [e.step for e in events.Scalars("val/acc")] == [0, 1]


def test_resume_is_bit_exact(foreign_nets, small_data_dir, tmp_path, capsys):
    net = foreign_nets("a")
    constant = ("--scheduler", "none", "--warmup-epochs", 0)  # so that --epochs does not move the schedule
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(own(net, straight, "--epochs", 2, *constant) + common(small_data_dir, tmp_path)) == 0
    assert main(own(net, split, "--epochs", 1, *constant) + common(small_data_dir, tmp_path)) == 0
    resume = ["--resume", split / "last.pt", "--model-def", f"{net.file}:{net.cls}", "--epochs", 2, "--quiet"]
    assert main(resume) == 0, capsys.readouterr().err
    for name in ("best.pt", "last.pt", "best.state_dict.pt"):
        a, b = load(straight / name), load(split / name)
        a, b = a.get("model", a), b.get("model", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_compile(foreign_nets, small_data_dir, tmp_path, capsys):
    net, out = foreign_nets("a"), tmp_path / "run"
    assert main(own(net, out, "--compile", "--epochs", 2) + common(small_data_dir, tmp_path)) == 0, \
        capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "compile_warmup_s" in metrics and metrics["finished"] is True
    model = net.load_class()(**net.kwargs)
    model.load_state_dict(load(out / "best.state_dict.pt"))  # no _orig_mod. prefix left by torch.compile


def test_torchrun_with_two_processes(foreign_nets, small_data_dir, tmp_path):
    net, out = foreign_nets("a"), tmp_path / "run"
    result = torchrun(*own(net, out, "--epochs", 1), *common(small_data_dir, tmp_path), "--amp", "off")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    model = net.load_class()(**net.kwargs)
    model.load_state_dict(load(out / "best.state_dict.pt"))  # no module. prefix left by DDP


def test_an_ensemble_of_the_users_model_and_ours(foreign_nets, small_data_dir, trained_checkpoint):
    """--model-def and --normalize apply to the file with no record; ours brings its own."""
    net = foreign_nets("a")
    result = run_script("test_model.py", "--model-path", net.weights, trained_checkpoint, "--model-def",
                        f"{net.file}:{net.cls}", "--model-kwargs", json.dumps(net.kwargs), "--normalize", net.mean,
                        net.std, "--data-dir", small_data_dir, "--full", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stdout
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks[f"{net.weights}: quick eval"]["data"]["accuracy"] == pytest.approx(net.accuracy, abs=1e-6)
    assert checks["ensemble"]["ok"] and checks["ensemble"]["data"]["accuracy"] > 0.5


def test_model_def_for_a_file_of_our_own_architecture_is_refused(foreign_nets, trained_checkpoint, small_data_dir,
                                                                   tmp_path, capsys):
    net = foreign_nets("a")
    argv = ["--model-path", trained_checkpoint, "--model-def", f"{net.file}:{net.cls}", "--output",
            tmp_path / "o" / "best.pt", *common(small_data_dir, tmp_path)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (f"error: --model-def: {trained_checkpoint} records its own "
                                               "architecture (cnn3); drop --model-def")
    assert not (tmp_path / "o").exists()
