"""Distillation (--teacher): the loss, each teacher's own normalisation, the cached targets, the bad teachers,
and a distilled run that resumes exactly and reloads, for our cnn3 and for a user's class."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SMALL_RUN, finetune, run_script
from torch import nn

import finetune_gpu
from fashion_ft import system
from fashion_ft.checkpoint import make_checkpoint
from fashion_ft.config import Config
from fashion_ft.data import augmented
from fashion_ft.engine import ComputeSettings, Teacher, Teachers, TrainStep, build_optimizer, build_schedulers
from fashion_ft.model import build_model

CPU = ComputeSettings(torch.device("cpu"), system.AmpPolicy(None, False), 0.0, 1.0)


def step_of(model):
    """A training step that distils at alpha 0.7 and temperature 2 (its targets are given to it)."""
    cfg = Config()
    optimizer = build_optimizer(model, cfg, cfg.lr)
    return TrainStep(model, optimizer, build_schedulers(optimizer, cfg, 10), torch.amp.GradScaler("cpu", enabled=False),
                     0.0, None, teachers=Teachers([], 2.0, sources=[]), kd_alpha=0.7)


def test_the_loss_is_hintons_and_a_log_softmax_model_gives_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    twin = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(1))  # as a model trained with nll_loss
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    targets = torch.rand(8, 10).softmax(1)
    logits = model(x).detach()
    expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * 4 * F.kl_div((logits / 2).log_softmax(1), targets,
                                                                      reduction="sum") / 8
    losses = [step_of(m)(x, y, CPU, targets)[0] for m in (model, twin)]
    assert losses[0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)


def test_each_teacher_sees_the_batch_normalised_its_own_way():
    torch.manual_seed(0)
    nets, seen = [nn.Sequential(nn.Flatten(), nn.Linear(784, 10)) for _ in range(2)], []
    for net in nets:
        net.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    teachers = Teachers([Teacher(nets[0], 0.5, 0.25), Teacher(nets[1], 0.1307, 0.3081)], 2.0, sources=[])
    x01 = torch.rand(4, 1, 28, 28)
    before = x01.clone()
    targets = teachers.targets(x01, CPU)
    assert torch.equal(x01, before)  # the student's input is normalised from it afterwards
    assert torch.allclose(seen[0], (before - 0.5) / 0.25) and torch.allclose(seen[1], (before - 0.1307) / 0.3081)
    with torch.no_grad():
        expected = sum((net(x) / 2).softmax(1) for net, x in zip(nets, seen[:2])) / 2
    assert torch.allclose(targets, expected, atol=1e-6)


def test_cached_targets_are_the_ones_computed_per_batch():
    torch.manual_seed(0)
    teacher = build_model("cnn3", {"channels": [4, 8, 8], "hidden": 16}).eval()
    teachers = Teachers([Teacher(teacher, 0.286, 0.353)], 1.0, sources=[])
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    teachers.fill_cache(images, CPU, batch_size=16)
    assert torch.allclose(teachers.cache[7:19], teachers.targets(augmented(images[7:19], None, None), CPU), atol=1e-6)


def saved(tmp_path, obj):
    torch.save(obj, tmp_path / "teacher.pt")
    return tmp_path / "teacher.pt"


def edited(change):
    """A teacher: the trained checkpoint as `change` returns it."""
    return lambda tmp_path, trained: saved(tmp_path, change(torch.load(trained, weights_only=True)))


FIVE = {"channels": [4, 8, 8], "hidden": 16, "num_classes": 5}
USERS = {"given": "net.py", "resolved": None, "class": "Net", "sha256": None}
BAD_TEACHERS = {  # name: (teacher, extra flags, exit code, what the one line says)
    "missing": (lambda t, c: t / "none.pt", [], 1, "checkpoint not found"),
    "a user's class": (edited(lambda c: {**c, "arch": "user", "model_def": USERS}), [], 1,
                       "only a checkpoint this tool wrote"),
    "a bare state_dict": (edited(lambda c: c["model"]), [], 1, "only a checkpoint this tool wrote"),
    "NaN weights": (edited(lambda c: {**c, "model": {k: v * float("nan") if v.is_floating_point() else v
                                                     for k, v in c["model"].items()}}), [], 1, "NaN/Inf weights"),
    "five classes": (lambda t, c: saved(t, make_checkpoint(build_model("cnn3", FIVE), "cnn3", FIVE)), [], 1,
                     "5 output classes"),
    "another split": (lambda t, c: c, ["--val-size", "600"], 2, "was trained with another validation split"),
    "alpha above 1": (lambda t, c: c, ["--kd-alpha", "1.5"], 2, "--kd-alpha: must be in [0, 1]"),
    "temperature 0": (lambda t, c: c, ["--kd-temperature", "0"], 2, "--kd-temperature: must be > 0"),
    "alpha without a teacher": (None, ["--kd-alpha", "0.5"], 2, "--kd-alpha: only with --teacher"),
}


@pytest.mark.parametrize("case", list(BAD_TEACHERS))
def test_a_bad_teacher_is_one_line_and_writes_nothing(case, tmp_path, small_data_dir, trained_checkpoint, capsys):
    make, extra, code, fragment = BAD_TEACHERS[case]
    teacher = ["--teacher", make(tmp_path, trained_checkpoint)] if make else []
    out = tmp_path / "out"
    argv = ["--model-path", trained_checkpoint, *teacher, "--data-dir", small_data_dir, "--output", out / "b.pt",
            "--logdir", tmp_path / "tb", "--limit-train", 256, "--epochs", 1, *SMALL_RUN, *extra]
    assert finetune_gpu.main([str(a) for a in argv]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert fragment in err[-1] and "Traceback" not in "\n".join(err), err
    assert not out.exists() and not (tmp_path / "tb").exists()


@pytest.mark.slow  # four short runs
@pytest.mark.parametrize("augment", ["none", "light"], ids=["cached targets", "targets every step"])
def test_a_distilled_run_resumes_exactly_reloads_and_stops_if_its_teacher_changed(augment, tmp_path, small_data_dir,
                                                                                   trained_checkpoint):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(trained_checkpoint.read_bytes())
    kd = ["--teacher", teacher, "--kd-alpha", 0.8, "--kd-temperature", 2, "--augment", augment,
          "--scheduler", "none", "--warmup-epochs", 0]
    for name, epochs in (("straight", 2), ("split", 1)):
        result, _ = finetune(tmp_path, small_data_dir, trained_checkpoint, *kd, "--epochs", epochs, name=name,
                             limit_train=512)
        assert result.returncode == 0, result.stderr
    split = tmp_path / "split"
    resume = ("finetune_gpu.py", "--resume", split / "last.pt", "--quiet", "--epochs")
    result = run_script(*resume, 2)
    assert result.returncode == 0, result.stderr
    last = torch.load(split / "last.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], last["model"][k]) for k in straight)
    assert last["config"]["teacher"] == [str(teacher)] and last["config"]["kd_alpha"] == 0.8
    assert last["teachers"][0]["path"] == str(teacher) and len(last["teachers"][0]["sha256"]) == 64
    checked = run_script("test_model.py", "--model-path", split / "best.pt", "--data-dir", small_data_dir, "--device",
                         "cpu")
    assert checked.returncode == 0, checked.stdout
    torch.save({**torch.load(teacher, weights_only=True), "created": "another day"}, teacher)
    refused, allowed = run_script(*resume, 3), run_script(*resume, 3, "--override-resume")
    assert refused.returncode == 2 and "changed since the run began" in refused.stderr
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.slow  # two short runs each
@pytest.mark.parametrize("users", [True, False], ids=["users_class", "shipped_cnn3"])
def test_the_distill_plan_teaches_resumes_and_reloads(users, foreign_nets, small_data_dir, tmp_path):
    """--preset distill: the shipped ResNet-20 teaches the user's network (a) (MNIST's normalisation,
    log_softmax, no split record) or our shipped cnn3; validation on the test half, so that no teacher's
    split record matters on this small data."""
    net, out = foreign_nets("a"), tmp_path / "run"
    definition = ["--model-def", f"{net.file}:{net.cls}"] if users else []
    model = ([net.weights, *definition, "--model-kwargs", json.dumps(net.kwargs), "--normalize", net.mean, net.std]
             if users else [REPO / "model" / "mnist_cnn3.pt"])
    first = run_script("finetune_gpu.py", "--model-path", *model, "--preset", "distill", "--val-from", "test-half",
                       "--epochs", 1, "--data-dir", small_data_dir, "--logdir", tmp_path / "tb", "--limit-train", 512,
                       "--batch-size", 64, "--output", out / "best.pt", "--quiet", "--device", "cpu")
    assert first.returncode == 0, first.stderr
    config = torch.load(out / "last.pt", weights_only=True)["config"]
    assert (config["teacher"], config["kd_alpha"], config["kd_temperature"]) == (["model/resnet20.pt"], 0.5, 1.0)
    resumed = run_script("finetune_gpu.py", "--resume", out / "last.pt", "--epochs", 2, *definition, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2
    checked = run_script("test_model.py", "--model-path", out / "best.pt", *definition, "--data-dir", small_data_dir,
                         "--device", "cpu")
    assert checked.returncode == 0, checked.stdout


@pytest.mark.parametrize("temperature, warned", [(1, False), (50, True)])
def test_targets_near_uniform_are_described_and_warned_of(temperature, warned, tmp_path, small_data_dir,
                                                          trained_checkpoint, capsys):
    argv = ["--model-path", trained_checkpoint, "--teacher", trained_checkpoint, "--kd-temperature", temperature,
            "--augment", "none", "--data-dir", small_data_dir, "--output", tmp_path / "o" / "b.pt", "--logdir",
            tmp_path / "tb", "--limit-train", 256, "--epochs", 1, *[a for a in SMALL_RUN if a != "--quiet"]]
    assert finetune_gpu.main([str(a) for a in argv]) == 0
    out, err = capsys.readouterr()
    assert f"targets at T {temperature}: mean top probability" in out and "computed once" in out, out
    assert ("are almost uniform" in err) == warned, err
