"""The user's own network, as the person this tool is for has it (tests/foreign.py): a class in their own
script, a bare state_dict or a DataParallel dict, logits or log_softmax, their own normalisation."""

import json

import pytest
import torch
from conftest import SMALL_RUN, head_parameters, run_script

import finetune_gpu
import test_model
from fashion_ft import trainer
from fashion_ft.data import CANDIDATES, suggestion
from fashion_ft.model import file_sha256

pytestmark = pytest.mark.slow  # each network is trained once, then run through the real scripts

# The user's own class (its weights fit) with another forward, and a class of theirs from scratch.
OWN_CLASS = ("import pathlib\nexec(pathlib.Path({net_file!r}).read_text())\nclass Mine(Net):\n"
             "    def forward(self, x):\n        y = super().forward(x)\n")
TORCH_NET = "from torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n"
BAD_DEFINITIONS = {  # name: (the user's file, its class Mine or else Net named; exit code; what the one line says)
    "missing file": (None, 2, "not found"),
    "no such class": ("class Other: pass\n", 1, "has no class Net"),
    "not a module": ("Net = 3\n", 1, "is not an nn.Module subclass"),
    "import raises": ("raise ValueError('no GPU here')\n", 1, "importing it failed: ValueError: no GPU here"),
    "syntax error": ("def broken(:\n", 1, "syntax error"),
    "top-level parse_args": ("import argparse\np = argparse.ArgumentParser()\np.add_argument('--epochs', required=True)"
                             "\np.parse_args()\n", 1, "importing it exited"),
    "constructor fails": (TORCH_NET + "        raise RuntimeError('needs a config file')\n", 1,
                          "failed: RuntimeError: needs a config"),
    "weights do not fit": (TORCH_NET + "        super().__init__()\n        self.fc = nn.Linear(784, 10)\n"
                           "    def forward(self, x):\n        return self.fc(x.flatten(1))\n", 1,
                           "the weights do not fit"),
    "a tuple as output": (f"{OWN_CLASS}        return y, y\n", 1, "gives a tuple"),
    "probabilities": (f"{OWN_CLASS}        return y.softmax(1)\n", 1, "returns probabilities"),
    "a missing module": ("import tensorboardX\n", 1, "-m pip install tensorboardX"),
}


@pytest.mark.parametrize("case", list(BAD_DEFINITIONS))
def test_a_bad_definition_is_one_line_and_writes_nothing(tmp_path, small_data_dir, foreign_nets, capsys, case):
    net, (text, code, fragment) = foreign_nets("a"), BAD_DEFINITIONS[case]
    if text is not None:
        (tmp_path / "user-net.py").write_text(text.format(net_file=str(net.file)))
    mine = text is not None and text.startswith(OWN_CLASS)
    definition = ["--model-def", f"{tmp_path / 'user-net.py'}:{'Mine' if mine else 'Net'}",
                  *(["--model-kwargs", json.dumps(net.kwargs)] if mine else [])]
    before = sorted(tmp_path.rglob("*"))
    argv = ["--model-path", net.weights, *definition, "--data-dir", small_data_dir, "--output",
            tmp_path / "out" / "best.pt", "--logdir", tmp_path / "tb", *SMALL_RUN, "--epochs", 1]
    assert finetune_gpu.main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before  # no output folder, no __pycache__ by the user's file
    result = run_script("test_model.py", "--model-path", net.weights, *definition, "--device", "cpu")
    printed = result.stdout + result.stderr  # test_model.py refuses it in the same words
    assert result.returncode == code and fragment in printed and "Traceback" not in printed, printed


def checked(net, *extra) -> tuple[int, dict]:
    """test_model.py --full --json, the user's weights first, their class named: (exit code, checks by name)."""
    result = run_script("test_model.py", "--model-path", net.weights, "--model-def", f"{net.file}:{net.cls}",
                        "--model-kwargs", json.dumps(net.kwargs), *extra, "--device", "cpu", "--full", "--json")
    return result.returncode, {c["name"]: c for c in json.loads(result.stdout)["checks"]}


@pytest.mark.parametrize("name", "abcd")
def test_test_model_gives_the_users_own_accuracy_and_checks_the_normalisation(name, foreign_nets, small_data_dir,
                                                                               trained_checkpoint):
    """--normalize applies to the file with no record (ours, in the ensemble, brings its own): it is not guessed.
    With none given or recorded, the default (Fashion-MNIST's) is checked against the common ones on training
    images: (b)-(d) were trained with it, so it passes and gives their own accuracy; (a) was trained with
    MNIST's, and where the rule finds that clearly better it names the flag."""
    net = foreign_nets(name)
    code, checks = checked(net, "--model-path", trained_checkpoint, "--data-dir", small_data_dir, "--normalize",
                           net.mean, net.std)
    assert code == 0, checks
    assert checks[f"{net.weights}: quick eval"]["data"]["accuracy"] == pytest.approx(net.accuracy, abs=1e-6)
    assert checks[f"{net.weights}: train step"]["data"]["channels_last"] == (name != "d")  # (d): .view, so NCHW
    assert checks["ensemble"]["ok"] and checks["ensemble"]["data"]["accuracy"] > 0.5
    assert not [c for c in checks if c.endswith("normalisation")]
    _, checks = checked(net, "--data-dir", small_data_dir)
    row = checks["normalisation"]
    if name == "a":
        assert row["ok"] or "--normalize 0.1307 0.3081" in row["detail"], row
    else:
        assert row["ok"] and "none recorded" in row["detail"], row
        assert checks["quick eval"]["data"]["accuracy"] == pytest.approx(net.accuracy, abs=1e-6)


@pytest.mark.parametrize("name", "abcd")
def test_fine_tune_frozen_resume_reload_and_the_plain_state_dict(name, foreign_nets, small_data_dir, tmp_path, capsys):
    """The record (path and sha256 of the user's file) names the class; only --model-def runs it, on every load.
    The file edited since is the user's choice: --resume with --model-def goes on, and records the new sha256."""
    net, out = foreign_nets(name), tmp_path / "run"
    script = tmp_path / net.file.name  # the user's file, which tells when it is imported
    script.write_text(net.file.read_text() + "\nopen(__file__ + '.imported', 'w').close()\n")
    definition = ["--model-def", f"{script}:{net.cls}"]
    common = ["--data-dir", small_data_dir, "--logdir", tmp_path / "tb", *SMALL_RUN, "--limit-train", 512]
    argv = ["--model-path", net.weights, *definition, "--model-kwargs", json.dumps(net.kwargs), "--normalize",
            net.mean, net.std, "--output", out / "best.pt", "--freeze-conv", "--lr", 0.01, *common, "--epochs", 1]
    assert finetune_gpu.main([str(a) for a in argv if a != "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "trainable: " in printed
    assert ("channels_last is off, the model runs in NCHW" in printed) == (name == "d")  # (d) flattens with .view
    (tmp_path / (script.name + ".imported")).unlink()
    assert test_model.main(["--model-path", str(out / "best.pt"), "--device", "cpu", "--json"]) == 1
    load = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "load")
    assert f"pass --model-def {script}:{net.cls}" in load["detail"], load
    resumed = ["--resume", out / "last.pt", "--epochs", 2, *common]
    assert finetune_gpu.main([str(a) for a in resumed]) == 1
    assert f"pass --model-def {script}:{net.cls}" in capsys.readouterr().err
    assert not (tmp_path / (script.name + ".imported")).exists()  # neither script imported the recorded file
    script.write_text(script.read_text() + "\n# edited\n")
    assert finetune_gpu.main([str(a) for a in [*resumed, *definition]]) == 0, capsys.readouterr().err
    best, last = (torch.load(out / f, weights_only=True) for f in ("best.pt", "last.pt"))
    assert best["model_def"]["class"] == net.cls and best["normalize"] == {"mean": net.mean, "std": net.std}
    assert last["model_def"]["sha256"] == file_sha256(script)
    assert test_model.main(["--model-path", str(out / "best.pt"), *definition, "--data-dir", str(small_data_dir),
                            "--device", "cpu"]) == 0, capsys.readouterr().out
    plain = torch.load(out / "best.state_dict.pt", weights_only=True)
    plain = plain if net.container == "bare" else plain[net.container]
    model = net.load_class()(**net.kwargs)
    model.load_state_dict(plain)  # in the user's own script, with the key names of their class
    assert all(torch.equal(plain[k], v) for k, v in best["model"].items())
    # --freeze-conv, kept by the resume: the features as loaded (weights and BatchNorm statistics), the head trained
    loaded = torch.load(net.weights, weights_only=True)
    loaded = {k.removeprefix("module."): v for k, v in loaded.get("model_state_dict", loaded).items()}
    head = head_parameters(model)
    head_modules = {k.rpartition(".")[0] for k in head}  # their BatchNorm1d statistics train with them
    assert not {k for k, t in last["model"].items() if k.rpartition(".")[0] not in head_modules
                and not torch.equal(t, loaded[k])}
    assert any(not torch.equal(last["model"][k], loaded[k]) for k in head)


SUGGESTION_RULE = [  # (accuracy in use, the best other, whether it is suggested)
    (0.34, 0.93, True), (0.10, 0.41, True), (0.60, 0.91, True), (0.25, 0.54, False), (0.90, 0.93, False),
]


@pytest.mark.parametrize("current, other, suggested", SUGGESTION_RULE)
def test_the_normalisation_rule(current, other, suggested):
    advice = suggestion({(0.2860, 0.3530): current, CANDIDATES["MNIST's"]: other, (0.0, 1.0): 0.1}, (0.2860, 0.3530))
    assert (advice is not None) == suggested
    assert not suggested or ("MNIST's normalisation" in advice and "--normalize 0.1307 0.3081" in advice)


@pytest.mark.parametrize("explicit", [False, True], ids=["refused", "warned of"])
def test_a_normalisation_far_worse_than_a_candidate(explicit, foreign_nets, small_data_dir, trained_checkpoint,
                                                     tmp_path, capsys, monkeypatch):
    """The scores are fixed here (the rule is tested above). With no --normalize, fine-tuning is refused: exit 2,
    nothing written; an explicit --normalize is the user's to keep: a warning names the better one."""
    monkeypatch.setattr(trainer, "compare", lambda model, images, labels, current: {
        current: 0.12, CANDIDATES["MNIST's"]: 0.81})
    net = foreign_nets("a")
    model = ([trained_checkpoint, "--normalize", 0.5, 0.5] if explicit else
             [net.weights, "--model-def", f"{net.file}:{net.cls}", "--model-kwargs", json.dumps(net.kwargs)])
    argv = ["--model-path", *model, "--output", tmp_path / "o" / "b.pt", "--data-dir", small_data_dir, "--logdir",
            tmp_path / "tb", *SMALL_RUN, "--limit-train", 256, "--epochs", 1]
    assert finetune_gpu.main([str(a) for a in argv]) == (0 if explicit else 2)
    err = capsys.readouterr().err.strip().splitlines()
    advice = "looks trained with MNIST's normalisation: 81% with --normalize 0.1307 0.3081, 12% with the one in use"
    if explicit:
        assert any(line.startswith(f"warning: this model {advice}") and "is --normalize 0.5 0.5 the one" in line
                   for line in err), err
    else:
        assert err[-1].startswith(f"error: this model {advice}") and not (tmp_path / "o").exists(), err
