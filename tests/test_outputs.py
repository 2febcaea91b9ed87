"""A run's files: no output is another output or an input, only a regular file is ever replaced, earlier
results are kept without --overwrite, folders are checked up front, TensorBoard run folders are never shared,
one live run per output folder. Every refusal is one line, of the right kind, and changes no file."""

import contextlib
import dataclasses
import errno
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from conftest import REPO, SMALL_RUN, run_script, write_split

from fashion_ft import outputs
from fashion_ft.config import Config
from fashion_ft.data import CLASSES
from fashion_ft.errors import UsageError, UserError
from fashion_ft.outputs import RunFiles, RunLock, check_disk_space, check_logdir, check_run_files
from fashion_ft.trainer import claim_outputs


def tree(folder: Path) -> dict:
    """Every entry under folder (rglob follows no link): a file's bytes, a link's target, 'dir' for a folder, the
    type of anything else (never read: a pipe would block)."""
    return {str(path.relative_to(folder)): "-> " + os.readlink(path) if path.is_symlink() else "dir" if path.is_dir()
            else path.read_bytes() if path.is_file() else stat.filemode(path.lstat().st_mode)
            for path in folder.rglob("*")}


def make(folder: Path, entries) -> None:
    """'name/': an empty folder; 'name/file': a folder holding a file (another run's events);
    'name': a file; 'name@target': a symlink to target; 'name|': a named pipe."""
    folder.mkdir(exist_ok=True)
    for entry in entries:
        path = folder / entry.split("@")[0].rstrip("|")
        path.parent.mkdir(parents=True, exist_ok=True)
        if "@" in entry:
            path.symlink_to(entry.split("@")[1])
        else:  # a pipe, a folder or a file
            {"|": os.mkfifo, "/": Path.mkdir}.get(entry[-1], lambda file: file.write_bytes(b"events"))(path)


def unchanged(root: Path, refusal: str | None, call, *args, kind=UsageError, **kwargs):
    """call(*args, **kwargs) changes nothing under root: it returns what it returns or, given a `refusal`, raises
    exactly `kind` on one printable line matching it, and returns the message."""
    before = tree(root)
    with pytest.raises(kind, match=refusal) if refusal else contextlib.nullcontext() as info:
        result = call(*args, **kwargs)
    if refusal:
        result = str(info.value)
        assert type(info.value) is kind and result.isprintable()
    assert tree(root) == before
    return result


def check(best: Path, plain=True, model_path=None, resume=None, overwrite=False) -> None:
    """check_run_files for a run writing best; `plain` False: its input was no plain state_dict, so it writes none."""
    files = RunFiles.for_output(str(best))
    check_run_files(files if plain else dataclasses.replace(files, plain=None), resume=resume, overwrite=overwrite,
                    inputs={"--model-path": model_path, "--resume": resume})


# ---------------------------------------------------------------- where the files go

FOLDERS = ["result/x/", "result/x/.", "result/x/..", "result/", ".", "result/x", "result"]


@pytest.mark.parametrize("name", [*FOLDERS, "last.pt", "metrics.json", ".lock"])
def test_an_output_naming_a_folder_or_another_output_is_a_usage_error_that_shows_a_file_name(tmp_path, name):
    (tmp_path / "result" / "x").mkdir(parents=True)
    path = f"{tmp_path}/{name}"
    fault, suggestion = (("names a folder", os.path.join(path, "model.pt")) if name in FOLDERS
                         else (f"is where the run keeps its {name}", tmp_path / "model.pt"))
    message = unchanged(tmp_path, f"--output .* {fault}", RunFiles.for_output, path)
    assert message.endswith(f"e.g. --output {suggestion}")


def test_the_other_files_go_beside_the_best_model(tmp_path):
    files = RunFiles.for_output(str(tmp_path / "r" / "model[1].pt"))  # a name with glob characters
    assert (files.last, files.metrics, files.lock, files.plain) == tuple(
        tmp_path / "r" / name for name in ("last.pt", "metrics.json", ".lock", "model[1].state_dict.pt"))
    assert files.names() == ("model[1].pt", "last.pt", "metrics.json", "model[1].state_dict.pt")  # atomic_write's


# ---------------------------------------------------------------- what the run may replace

OUTPUTS = ("model.pt", "last.pt", "metrics.json", "model.state_dict.pt", ".lock")
# what stands where the run writes a file, as make plants it in the folder {kind}-{output}
NOT_FILES = {"folder": "/", "link elsewhere": "@../x/model.pt", "pipe": "|", "link to another output": "@{other}"}


def plant(t: Path) -> None:
    """Two finished runs, x/ and y/; files the cases below put in the way or give as inputs."""
    make(t, [f"{run}/{name}" for run in "xy" for name in ("model.pt", "last.pt", "metrics.json")])
    make(t, ["soft.pt@x/model.pt", "saved/run.pt", "alias@x", "notes.txt", "m/metrics.json",
             "s/model.state_dict.pt", "q/model.state_dict.pt|", "a@b", "b@a", "l/self@self"])
    make(t, [f"{kind}-{name}/{name}" + how.format(other="metrics.json" if name == "last.pt" else "last.pt")
             for kind, how in NOT_FILES.items() for name in OUTPUTS])
    os.link(t / "x" / "last.pt", t / "hard.pt")


NEVER, RESULTS = "not even with --overwrite", "without --overwrite"
CHECKS = {  # case -> (--output, inputs (under tmp_path; "rel:": relative to the cwd); the refusal, and when)
    "model path is the output": ("x/model.pt", {"model_path": "x/model.pt"}, "x/model.pt.* --model-path", NEVER),
    "model path spelled relative": ("x/model.pt", {"model_path": "rel:x/model.pt"}, "the --model-path input", NEVER),
    "model path is last.pt": ("x/other.pt", {"model_path": "x/last.pt"}, "writes .*x/last.pt.* --model-path", NEVER),
    "model path is metrics.json": ("x/other.pt", {"model_path": "x/metrics.json"}, "metrics.json.* --model", NEVER),
    "model path is the plain one": ("x/model.pt", {"model_path": "x/model.state_dict.pt"},
                                    "x/model.state_dict.pt, which is the --model-path input", NEVER),
    "a link to the output": ("x/model.pt", {"model_path": "soft.pt"}, "is the --model-path input", NEVER),
    "a hard link to last.pt": ("x/model.pt", {"model_path": "hard.pt"}, "writes .*x/last.pt.* --model-path", NEVER),
    "resume is the output": ("saved/run.pt", {"resume": "saved/run.pt"}, "is the --resume input", NEVER),
    "a file where the folder goes": ("notes.txt/model.pt", {}, "cannot create the folder .*notes.txt is a file", NEVER),
    "a file above the folder": ("notes.txt/sub/model.pt", {}, "cannot create the folder .*notes.txt is a file", NEVER),
    "--output is a symlink loop": ("a", {}, "^--output .*/a: symlink loop; point --output at a real path$", NEVER),
    "--output below a loop": ("l/self/m.pt", {}, "^--output .*/l/self/m.pt: symlink loop", NEVER),
    "--model-path is a loop": ("new/m.pt", {"model_path": "a"}, "^--model-path .*/a: symlink loop", NEVER),
    "--resume below a loop": ("new/m.pt", {"resume": "l/self/m.pt"}, "^--resume .*/l/self/m.pt: symlink loop", NEVER),
    "the system's null device": (os.devnull, {}, f"--output: {os.devnull} is not a regular file", NEVER),
    "an earlier best model": ("x/model.pt", {}, "--output: .*x/model.pt already exists; pass --overwrite", RESULTS),
    "an earlier last.pt": ("x/other.pt", {}, "x/last.pt already exists", RESULTS),
    "an earlier metrics.json": ("m/model.pt", {}, "m/metrics.json already exists", RESULTS),
    "an earlier plain state_dict": ("s/model.pt", {}, "s/model.state_dict.pt already exists", RESULTS),
    "resume into another run's folder": ("y/model.pt", {"resume": "x/last.pt"}, "y/model.pt already exists", RESULTS),
    "a new folder": ("new/sub/model.pt", {"model_path": "in.pt"}, None, None),
    "resume in place": ("x/model.pt", {"resume": "x/last.pt"}, None, None),
    "resume in place, relative": ("x/model.pt", {"resume": "rel:x/last.pt"}, None, None),
    "resume in place, through a link": ("x/model.pt", {"resume": "alias/last.pt"}, None, None),
    "resume into a new folder": ("z/model.pt", {"resume": "x/last.pt"}, None, None),
    "a plain state_dict the run does not write": ("s/model.pt", {"plain": False}, None, None),
    "a pipe where the run writes no plain state_dict": ("q/model.pt", {"plain": False}, None, None),
    **{f"a {kind} as {name}": (f"{kind}-{name}/model.pt", {}, "names a folder" if f"{kind}{name}" == "foldermodel.pt"
                               else f"{kind}-{name}/{name} is not a regular file", NEVER)
       for kind in NOT_FILES for name in OUTPUTS},  # only a regular file is replaced, even with --overwrite
}


@pytest.mark.parametrize("case", CHECKS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_inputs_are_never_replaced_nor_earlier_results_without_overwrite(tmp_path, case, overwrite):
    plant(tmp_path)
    best, inputs, refusal, when = CHECKS[case]
    paths = {flag: Path(os.path.relpath(tmp_path / path[4:])) if path.startswith("rel:") else tmp_path / path
             for flag, path in inputs.items() if flag != "plain"}
    unchanged(tmp_path, None if when == RESULTS and overwrite else refusal, check, tmp_path / best,
              inputs.get("plain", True), overwrite=overwrite, **paths)


def test_with_overwrite_only_the_files_the_run_writes_are_removed(tmp_path):
    """claim_outputs clears an earlier run's files, never a plain state_dict that this run will not write."""
    make(tmp_path / "x", ["model.pt", "last.pt", "metrics.json", "model.state_dict.pt"])
    files = dataclasses.replace(RunFiles.for_output(str(tmp_path / "x" / "model.pt")), plain=None)
    with contextlib.ExitStack() as stack:  # no starting weights: no space needed for them
        claim_outputs(Config(overwrite=True), files, {}, stack)
        assert sorted(os.listdir(tmp_path / "x")) == [".lock", "model.state_dict.pt"]


# ---------------------------------------------------------------- folders that cannot be written

@pytest.mark.parametrize("errno_", [errno.EACCES, errno.EROFS])
@pytest.mark.parametrize("flag", ["--output", "--logdir"])
def test_a_folder_we_may_not_write_is_refused_with_one_line(tmp_path, monkeypatch, errno_, flag):
    """The probe's own error stands in for a folder that root (CI) would write anyway."""
    cause = os.strerror(errno_)
    monkeypatch.setattr(outputs.tempfile, "TemporaryFile", mock.Mock(side_effect=OSError(errno_, cause)))
    call = (check, tmp_path / "model.pt") if flag == "--output" else (check_logdir, str(tmp_path), "run")
    unchanged(tmp_path, f"{flag}: cannot write in {tmp_path}: {cause}", *call, kind=UserError)


def test_low_disk_space_names_the_folder_and_the_space(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda _path: mock.Mock(free=1024))
    unchanged(tmp_path, r"--output: only 0.0 MiB free in .*not.*needs about 64 MiB", check_disk_space,
              tmp_path / "not" / "yet", 64 * 2**20, kind=UserError)
    unchanged(tmp_path, None, check_disk_space, tmp_path / "not" / "yet", 1024)


# ---------------------------------------------------------------- --logdir and --run-name

BAD_RUN_NAMES = ["", "../escape", "a/b", "/abs/run", "..", ".", "two\nlines", "cr\r", "esc\x1b[31mred", "tab\there",
                 "nul\0", "del\x7f", "c1\x85", "line\u2028sep", "para\u2029sep", "undecodable\udcff"]
RUNS = ("logs/run/events", "logs/run_1/events")
LOGDIRS = {  # (entries, --logdir, --run-name, resume) -> the run's folder (two runs never share one, as
    # Lightning's version_N; a resumed run goes on in its own), or what the refusal says
    ((), "logs", "run", False): Path("logs/run"),
    (("logs/run/",), "logs", "run", False): Path("logs/run"),  # an empty folder holds no run yet
    (RUNS[:1], "logs", "run", False): Path("logs/run_1"),
    (RUNS, "logs", "run", False): Path("logs/run_2"),
    (("logs/run/events", "logs/run_2/events"), "logs", "run", False): Path("logs/run_1"),  # the first free one
    (("logs/run/events", "logs/run_1"), "logs", "run", False): Path("logs/run_2"),  # a file
    (("logs/run/events", "logs/run_1@nowhere"), "logs", "run", False): Path("logs/run_2"),  # a link to nothing
    (("logs/other/", "logs/run@other"), "logs", "run", False): Path("logs/run"),  # a link inside --logdir is fine
    (("real/run/events", "logs@real"), "logs", "run", False): Path("logs/run_1"),  # --logdir a link: runs inside
    (RUNS, "logs", "run", True): Path("logs/run"),
    (("logs/run",), "logs", "run", False): "^--run-name run: .*run is a file; TensorBoard needs a folder",
    (("logs/run",), "logs", "run", True): "^--run-name run: .*run is a file; TensorBoard needs a folder",
    (("file",), "file", "run", False): "^--logdir: cannot create the folder .*: .*file is a file",
    (("file",), "file/sub", "run", False): "^--logdir: cannot create the folder .*file/sub/run: .*file is a file",
    (("a@b", "b@a"), "a/sub", "run", False): "^--logdir .*/a/sub: symlink loop",
    **{(("a@b", "b@a"), ".", "a", resume): "^--run-name .*/a: symlink loop" for resume in (False, True)},
    **{((), "new", name, False): Path("new", name) for name in ["2024_run-1.a", "run 1", "café_ü", "模型", "a-b.c_d~e"]},
    **{((), "new", name, False): re.escape(f"--run-name {name!r}") for name in BAD_RUN_NAMES},
}


@pytest.mark.parametrize("entries,logdir,run_name,resume", LOGDIRS)
def test_a_logdir_and_run_name_give_a_free_plain_folder_or_one_line(tmp_path, entries, logdir, run_name, resume):
    make(tmp_path, entries)
    expected = LOGDIRS[entries, logdir, run_name, resume]
    refusal = None if isinstance(expected, Path) else expected
    run = unchanged(tmp_path, refusal, check_logdir, str(tmp_path / logdir), run_name, resume=resume)
    assert refusal or run == tmp_path / expected


# ---------------------------------------------------------------- one live run per output folder

def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the lock until its stdin closes (`with`'s exit) or it is killed."""
    script = ("import sys; from fashion_ft.outputs import RunLock\n"
              "with RunLock(sys.argv[1]): print('locked', flush=True); sys.stdin.readline()")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("existing,written,left", [
    ([], [], []),  # failed before its first save: nothing left
    (["result/"], [], ["result"]),  # a folder that was there before is not ours to remove
    ([], ["result/notes.txt"], ["result", "result/notes.txt"]),  # x goes, result holds a file
    ([], ["result/x/y/"], ["result", "result/x", "result/x/y"]),  # not empty: stop there
])
@pytest.mark.parametrize("fails", [False, True])
def test_the_lock_holds_our_pid_and_its_folders_go_at_exit_while_empty(tmp_path, existing, written, left, fails):
    lock = tmp_path / "result" / "x" / ".lock"
    make(tmp_path, existing)
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext(), RunLock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
        make(tmp_path, written)
        if fails:
            raise RuntimeError("bad data")
    assert sorted(tree(tmp_path)) == left


def test_a_lock_that_cannot_be_taken_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.os, "open", mock.Mock(side_effect=PermissionError(errno.EACCES, "Permission denied")))
    unchanged(tmp_path, f"--output: cannot take the lock {tmp_path / 'new/x/.lock'}: Permission denied",
              RunLock(tmp_path / "new" / "x" / ".lock").__enter__, kind=UserError)


NAMES = ("model[1].pt", "last.pt", "metrics.json")  # a best model's name with glob characters
STALE = {  # an entry beside the lock -> whether a run that takes the lock removes it (a folder or a link: never)
    ".last.pt.ab12cd_9.tmp": True, ".model[1].pt.q.tmp": True, ".metrics.json.x1y2z3w4.tmp": True, "last.pt": False,
    ".other.pt.ab12cd_9.tmp": False, ".last.pt.tmp": False, ".last.pt.ab12cd_9": False, "last.pt.ab12cd_9.tmp": False,
    "notes.tmp": False, ".model1.pt.q.tmp": False, ".last.pt.dir.tmp/": False, ".last.pt.link.tmp@../victim.pt": False,
}


@pytest.mark.parametrize("entry,removed", STALE.items())
def test_taking_the_lock_removes_only_our_stale_temporaries(tmp_path, entry, removed):
    make(tmp_path, ["victim.pt", f"run/{entry}"])
    folder, name = tmp_path / "run", entry.split("@")[0].rstrip("/")
    with RunLock(folder / ".lock", clean=NAMES):
        assert os.path.lexists(folder / name) != removed
    assert (tmp_path / "victim.pt").read_bytes() == b"events"


@pytest.mark.filterwarnings("error")
def test_a_live_runs_folder_is_refused_and_a_killed_runs_is_taken_again(tmp_path):
    """The kernel drops a dead holder's flock: its file, pid and all, is no lock any more."""
    lock = tmp_path / "x" / ".lock"
    with hold_lock(lock) as holder:
        (lock.parent / ".last.pt.ab12cd_9.tmp").write_bytes(b"the live run is writing this")
        unchanged(tmp_path, f"--output folder {tmp_path / 'x'} is in use .*pid {holder.pid}",
                  RunLock(lock, clean=("last.pt",)).__enter__, kind=UserError)
        holder.kill()
    assert lock.read_text() == f"{holder.pid}\n"  # left behind
    with RunLock(lock, clean=("last.pt",)):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match=f"in use .*pid {os.getpid()}"):  # twice in one process
            RunLock(lock).__enter__()
    assert tree(tmp_path) == {"x": "dir"}  # the temporary and the lock have gone


def test_without_flock_one_warning_says_the_folder_is_not_locked_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.fcntl, "flock", mock.Mock(side_effect=OSError(errno.ENOLCK, "No locks available")))
    (tmp_path / ".lock").write_text("4242\n")  # a killed run's, or a live one's: without flock they look alike
    with pytest.warns(UserWarning, match=f"{tmp_path} is not locked .*No locks available"), RunLock(tmp_path / ".lock"):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / ".lock").exists()


# ---------------------------------------------------------------- the scripts (need the trainer's wiring)

CLI_ERRORS = {  # ({t}: tmp_path, holding x/ (a live run's in the last case) and a file) -> exit code, what it names
    "--output is a folder": (("--output", "{t}/x/"), 2, "--output"),
    "--logdir is a file": (("--output", "{t}/out/model.pt", "--logdir", "{t}/file"), 2, "--logdir"),
    "--run-name breaks a line": (("--output", "{t}/out/model.pt", "--run-name", "two\nlines\x1b[2J"), 2, "--run-name"),
    "no data, after the lock": (("--output", "{t}/new/x/model.pt", "--data-dir", "{t}/nowhere"), 1, "files not found"),
    "--limit-train too large": (("--output", "{t}/new/x/model.pt", "--limit-train", "100000"), 2, "--limit-train"),
    "a live run's folder": (("--output", "{t}/x/model.pt"), 1, "pid"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_a_run_refused_before_its_first_save_is_one_line_and_changes_no_file(tmp_path, small_data_dir, case):
    flags, code, needle = CLI_ERRORS[case]
    make(tmp_path, ["x/", "file"])
    with hold_lock(tmp_path / "x" / ".lock") if case == "a live run's folder" else contextlib.nullcontext():
        result = unchanged(tmp_path, None, run_script, "finetune_gpu.py", "--from-scratch", "--data-dir",
                           small_data_dir, "--logdir", tmp_path / "tb", *SMALL_RUN, "--epochs", "1", "--limit-train",
                           "256", *[a.format(t=tmp_path) for a in flags])  # a later flag wins
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and needle in lines[0], result.stderr


@pytest.mark.slow
def test_cli_two_runs_of_one_name_get_two_tensorboard_runs_and_a_resumed_run_keeps_its_own(tmp_path, small_splits,
                                                                                           trained_checkpoint):
    """Needs the trainer to pass resume= and to take the returned folder's name as the run name. And only a run
    from a plain state_dict writes one: beside a run from our checkpoint, one by the best model's name is the
    user's, not in the way and not removed by --overwrite. A class missing from the test set: null accuracy."""
    tb = tmp_path / "tb"
    images, labels = small_splits[2:]
    write_split(tmp_path / "data", "train", *small_splits[:2])
    write_split(tmp_path / "data", "test", images[labels != 0], labels[labels != 0])  # no T-shirt/top

    def finetune(out: str, *args):
        loud = [a for a in SMALL_RUN if a != "--quiet"]
        result = run_script("finetune_gpu.py", "--data-dir", tmp_path / "data", "--output", tmp_path / out / "best.pt",
                            "--logdir", tb, *loud, "--limit-train", "256", *args)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if line.startswith("tensorboard:")]

    make(tmp_path, ["a/best.state_dict.pt"])
    first = finetune("a", "--model-path", trained_checkpoint, "--overwrite", "--epochs", "1", "--run-name", "same")
    second = finetune("b", "--from-scratch", "--epochs", "1", "--run-name", "same")
    assert first + second == [f"tensorboard: tensorboard --logdir {tb}  (run {run})" for run in ("same", "same_1")]
    # what kill -9 in the middle of a save leaves, beside the user's own file
    make(tmp_path / "b", [*(f".{name}.k1ll3d_9.tmp" for name in ("last.pt", "best.pt", "metrics.json")), "notes.tmp"])
    resumed = finetune("b", "--resume", tmp_path / "b" / "last.pt", "--epochs", "2")
    assert resumed == second
    assert {run.name: len(list(run.glob("events.out.tfevents.*"))) for run in tb.iterdir()} == {"same": 1, "same_1": 2}
    assert sorted(os.listdir(tmp_path / "b")) == ["best.pt", "last.pt", "metrics.json", "notes.tmp"]
    assert (tmp_path / "a" / "best.state_dict.pt").read_bytes() == b"events"
    per_class = json.loads((tmp_path / "a" / "metrics.json").read_text())["per_class_test_acc"]
    assert per_class[CLASSES[0]] is None and all(isinstance(per_class[name], float) for name in CLASSES[1:])
