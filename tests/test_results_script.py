"""bench/results.py, the script behind the guide's results table: its --tiny mode run as a user runs it, and
the table it keeps after every plan."""

import gc
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import REPO

from bench import results
from fashion_ft.system import cpu_info


@pytest.mark.slow
def test_tiny_results_table(tmp_path, small_data_dir, trained_checkpoint):
    report = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "bench.results", "--tiny", "--plans", "light", "two-round", "--model-path",
         str(trained_checkpoint), "--device", "cpu", "--data-dir", str(small_data_dir), "--report-dir", str(report),
         "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600,  # minutes when other processes share the CPU
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((report / "results.json").read_text())["rows"]
    assert [r["plan"] for r in rows] == ["light", "two-round", "cnn3 ensemble of 2"]
    assert all(0.5 < r["test_acc"] <= 1 for r in rows)
    assert "--model-path " + str(tmp_path / "work" / "light" / "best.pt") in rows[1]["command"]
    table = (report / "results.md").read_text()
    assert "| light |" in table and "not a result" in table
    assert sorted(p.name for p in (report / "logs").iterdir()) == ["ensemble_cnn3.log", "light.log", "two-round.log"]


@pytest.fixture
def runs(monkeypatch):
    """Plans that finish at once with a model and 93% (or stop the run at `stop_at`), and ensembles; records
    the (plan, command) and (network, paths) that main ran."""
    runs = SimpleNamespace(plans=[], ensembles=[], stop_at=None)

    def fake_plan(name, cmd, out, logs):
        if name == runs.stop_at:
            raise KeyboardInterrupt
        runs.plans.append((name, cmd))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"a model")
        return {"plan": name, "command": " ".join(cmd[1:]), "exit_code": 0, "wall_s": 60.0, "test_acc": 0.93,
                "checkpoint": str(out)}

    def fake_ensemble(network, paths, args, logs):
        runs.ensembles.append((network, [str(p) for p in paths]))
        return {"plan": f"{network} ensemble of {len(paths)}", "exit_code": 0, "wall_s": 1.0, "command": "x"}

    monkeypatch.setattr(results, "run_plan", fake_plan)
    monkeypatch.setattr(results, "run_ensemble", fake_ensemble)
    return runs


def test_a_stopped_run_keeps_the_plans_it_finished(tmp_path, runs):
    """Every finished plan is written at once, so stopping the hours-long run loses only the plan in progress."""
    runs.stop_at = "deep"
    report = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt):
        results.main(["--plans", "light", "two-round", "deep", "--report-dir", str(report),
                      "--work-dir", str(tmp_path / "work")])
    saved = json.loads((report / "results.json").read_text())
    assert [r["plan"] for r in saved["rows"]] == ["light", "two-round"]
    assert saved["machine"].startswith("Measured ") and f" on {cpu_info()[0]}, " in saved["machine"]
    assert "| two-round | 93.00% |" in (report / "results.md").read_text()


def test_resume_runs_only_what_is_missing_or_changed(tmp_path, runs):
    common = ["--report-dir", str(tmp_path / "report"), "--work-dir", str(tmp_path / "work")]
    results.main(["--plans", "light", "head", *common])
    (tmp_path / "work" / "head" / "best.pt").unlink()  # a lost model is measured again
    results.main(["--plans", "light", "head", "conservative", "--resume", *common])
    results.main(["--plans", "light", "--resume", "--device", "cpu", *common])  # another command: run again
    assert [name for name, _ in runs.plans] == ["light", "head", "conservative", "head", "light"]  # in PLANS order
    saved = json.loads((tmp_path / "report" / "results.json").read_text())["rows"]
    assert [r["plan"] for r in saved] == ["light"] and "--device cpu" in saved[0]["command"]


def test_each_network_gets_its_own_ensemble_and_the_resnet_starts_from_random_weights(tmp_path, runs):
    work = tmp_path / "work"
    results.main(["--plans", "head", "resnet20-tune", "light", "resnet20", "--report-dir", str(tmp_path / "report"),
                  "--work-dir", str(work), "--resnet-model-path", "my/resnet.pt"])
    commands = dict(runs.plans)
    assert list(commands) == ["light", "head", "resnet20", "resnet20-tune"]
    assert "--model-path" not in commands["resnet20"] and "--preset resnet20 " in " ".join(commands["resnet20"])
    assert "--model-path " + str(REPO / "my/resnet.pt") in " ".join(commands["resnet20-tune"])
    assert runs.ensembles == [("cnn3", [str(work / p / "best.pt") for p in ("light", "head")]),
                              ("resnet20", [str(work / p / "best.pt") for p in ("resnet20", "resnet20-tune")])]


def test_a_plan_needs_the_plan_it_starts_from():
    with pytest.raises(SystemExit, match="two-round starts from the light plan's output; add light"):
        results.main(["--plans", "two-round"])


def test_machine_closes_the_files_it_reads(recwarn):
    results.machine()
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]
