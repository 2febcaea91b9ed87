"""Every feature of the two scripts on the user's own network (a) of tests/foreign.py: a BatchNorm CNN with a
BatchNorm1d head and log_softmax, MNIST's normalisation, a bare state_dict from a hyphenated script."""

import json

import pytest
import torch
from conftest import SMALL_RUN, load, run_script
from test_distributed import torchrun

import finetune_gpu

pytestmark = pytest.mark.slow


def own(net, out, small_data_dir, tmp_path, *extra) -> list[str]:
    """finetune_gpu.py's argv for network `net` into folder `out`."""
    return [str(a) for a in ["--model-path", net.weights, "--model-def", f"{net.file}:{net.cls}", "--model-kwargs",
                             json.dumps(net.kwargs), "--normalize", net.mean, net.std, "--output", out / "best.pt",
                             "--data-dir", small_data_dir, "--logdir", tmp_path / "tb", *SMALL_RUN,
                             "--limit-train", 512, *extra]]


def test_ema_flip_tta_tensorboard_never_worse_and_a_bit_exact_resume(foreign_nets, small_data_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net = foreign_nets("a")
    flags = ("--ema-decay", 0.9, "--tta", "flip", "--scheduler", "none", "--warmup-epochs", 0)  # a constant LR:
    straight, out = tmp_path / "straight", tmp_path / "split"  # --epochs does not move the schedule on resume
    assert finetune_gpu.main(own(net, straight, small_data_dir, tmp_path, *flags, "--epochs", 2)) == 0
    assert finetune_gpu.main(own(net, out, small_data_dir, tmp_path, *flags, "--run-name", "own", "--epochs", 1)) == 0
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
    assert [e.step for e in EventAccumulator(str(tmp_path / "tb" / "own")).Reload().Scalars("val/acc")] == [0, 1]
    resume = ["--resume", str(out / "last.pt"), "--model-def", f"{net.file}:{net.cls}", "--epochs", "2", "--quiet"]
    assert finetune_gpu.main(resume) == 0, capsys.readouterr().err
    for name in ("best.pt", "last.pt", "best.state_dict.pt"):
        a, b = load(straight / name), load(out / name)
        a, b = a.get("model", a), b.get("model", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("wrapper", ["compile", "torchrun"])
def test_a_wrapped_run_saves_weights_the_users_class_loads(wrapper, foreign_nets, small_data_dir, tmp_path, capsys):
    """No _orig_mod. prefix left by torch.compile, no module. prefix by DDP."""
    net, out = foreign_nets("a"), tmp_path / "run"
    if wrapper == "compile":  # the second epoch tells the compilation's cost
        assert finetune_gpu.main(own(net, out, small_data_dir, tmp_path, "--compile", "--epochs", 2)) == 0, \
            capsys.readouterr().err
    else:
        result = torchrun(*own(net, out, small_data_dir, tmp_path, "--epochs", 1, "--amp", "off"))
        assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["world_size"] == (2 if wrapper == "torchrun" else 1)
    assert ("compile_warmup_s" in metrics) == (wrapper == "compile")
    net.load_class()(**net.kwargs).load_state_dict(load(out / "best.state_dict.pt"))


def test_model_def_for_a_file_of_our_own_architecture_is_refused(foreign_nets, trained_checkpoint, small_data_dir,
                                                                   tmp_path, capsys):
    ours = ("--model-path", trained_checkpoint)  # after the user's, in place of it
    assert finetune_gpu.main(own(foreign_nets("a"), tmp_path / "o", small_data_dir, tmp_path, *ours)) == 2
    assert capsys.readouterr().err.strip() == (f"error: --model-def: {trained_checkpoint} records its own "
                                               "architecture (cnn3); drop --model-def")
    assert not (tmp_path / "o").exists()
