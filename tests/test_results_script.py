"""bench/results.py in its --tiny mode, so that the script behind the guide's table cannot rot."""

import json
import subprocess
import sys

from conftest import REPO


def test_tiny_results_table(tmp_path, real_data_dir):
    report = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "results.py"), "--tiny", "--plans", "light", "two-round",
         "--device", "cpu", "--data-dir", str(real_data_dir), "--report-dir", str(report),
         "--work-dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((report / "results.json").read_text())["rows"]
    assert [r["plan"] for r in rows] == ["light", "two-round", "ensemble of 2"]
    assert all(0.5 < r["test_acc"] <= 1 for r in rows)
    assert "--model-path " + str(tmp_path / "work" / "light" / "best.pt") in rows[1]["command"]
    table = (report / "results.md").read_text()
    assert "| light |" in table and "not a result" in table
    assert sorted(p.name for p in (report / "logs").iterdir()) == ["ensemble.log", "light.log", "two-round.log"]
