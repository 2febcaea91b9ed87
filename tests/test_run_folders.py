"""TensorBoard run folders: two runs never share one (the second gets NAME_1, as Lightning's version_N),
a resumed run goes on in its own, and the check creates nothing."""

import os

import pytest
from conftest import SMALL_RUN, run_script
from test_outputs import make, tree

from fashion_ft.outputs import check_logdir


@pytest.mark.parametrize("entries,resume,expected", [
    ([], False, "run"),
    (["run/"], False, "run"),  # an empty folder holds no run yet
    (["run/events"], False, "run_1"),
    (["run/events", "run_1/events"], False, "run_2"),
    (["run/events", "run_2/events"], False, "run_1"),  # the first free one
    (["run/events", "run_1"], False, "run_2"),  # a file
    (["run/events", "run_1@nowhere"], False, "run_2"),  # a link to nothing
    (["other/", "run@other"], False, "run"),  # a link inside --logdir is fine
    ([], True, "run"),
    (["run/events"], True, "run"),  # a resumed run goes on in its own folder
    (["run/events", "run_1/events"], True, "run"),
])
def test_a_taken_run_folder_gets_the_first_free_suffix_and_nothing_is_created(tmp_path, entries, resume, expected):
    make(tmp_path / "logs", entries)
    before = tree(tmp_path)
    assert check_logdir(str(tmp_path / "logs"), "run", resume=resume) == tmp_path / "logs" / expected
    assert tree(tmp_path) == before


def test_a_logdir_that_is_a_link_keeps_its_runs_inside(tmp_path):
    make(tmp_path / "real", ["run/events"])
    (tmp_path / "logs").symlink_to("real")
    assert check_logdir(str(tmp_path / "logs"), "run") == tmp_path / "logs" / "run_1"


@pytest.mark.slow
def test_cli_two_runs_of_one_name_get_two_tensorboard_runs_and_a_resumed_run_keeps_its_own(tmp_path, small_data_dir):
    """Needs the trainer to pass resume= and to take the returned folder's name as the run name."""
    def finetune(out: str, *args):
        loud = [a for a in SMALL_RUN if a != "--quiet"]
        result = run_script("finetune_gpu.py", "--data-dir", small_data_dir, "--output", tmp_path / out / "best.pt",
                            "--logdir", tmp_path / "tb", *loud, "--limit-train", "256", *args)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if line.startswith("tensorboard:")]

    first = finetune("a", "--from-scratch", "--epochs", "1", "--run-name", "same")
    second = finetune("b", "--from-scratch", "--epochs", "1", "--run-name", "same")
    assert first == [f"tensorboard: tensorboard --logdir {tmp_path / 'tb'}  (run same)"]
    assert second == [f"tensorboard: tensorboard --logdir {tmp_path / 'tb'}  (run same_1)"]
    stale = [".last.pt.k1ll3d_9.tmp", ".best.pt.k1ll3d_9.tmp", ".metrics.json.k1ll3d_9.tmp"]
    for name in [*stale, "notes.tmp"]:  # as kill -9 in the middle of a save leaves them, and the user's file
        (tmp_path / "b" / name).write_bytes(b"half written")
    resumed = finetune("b", "--resume", tmp_path / "b" / "last.pt", "--epochs", "2")
    assert resumed == second
    assert sorted(os.listdir(tmp_path / "tb")) == ["same", "same_1"]
    assert [len(list((tmp_path / "tb" / run).glob("events.out.tfevents.*"))) for run in ("same", "same_1")] == [1, 2]
    assert sorted(os.listdir(tmp_path / "b")) == ["best.pt", "last.pt", "metrics.json", "notes.tmp"]
