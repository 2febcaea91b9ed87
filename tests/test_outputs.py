"""A run's files: outputs never collide with each other or with an input, earlier results are kept
without --overwrite, folders are checked up front, one live run per output folder, and TensorBoard
trouble in the middle of a run stops the logging, not the run.

Every refusal is checked for the flag it names and for leaving the file tree exactly as it was.
Permission bits do not stop root (CI runs the tests as root): the chmod test skips there, and the
"not writable" message is also tested with os.access patched to deny."""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import REPO, SMALL_RUN, run_script, write_split

from fashion_ft import outputs, tblog
from fashion_ft.data import CLASSES, read_split
from fashion_ft.errors import UsageError, UserError
from fashion_ft.outputs import RunFiles, RunLock, check_disk_space, check_logdir, check_run_files

PSEUDO_FS = [p for p in ("/proc", "/sys") if os.path.isdir(p) and shutil.disk_usage(p).total == 0]


def tree(folder: Path) -> dict:
    """Every entry under folder: sha256 of files, the target of links, 'dir' for folders."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                state[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def make_run(folder: Path, best: str = "model.pt") -> RunFiles:
    """A finished run's three files, each with its own content."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (best, "last.pt", "metrics.json"):
        (folder / name).write_bytes(f"{folder.name}/{name}".encode())
    return RunFiles.for_output(str(folder / best))


def refused(kind, match: str, root: Path, check, *args, **kwargs) -> str:
    """check(*args, **kwargs) raises exactly `kind` matching `match`, and changes nothing under root."""
    before = tree(root)
    with pytest.raises(kind, match=match) as info:
        check(*args, **kwargs)
    assert type(info.value) is kind
    assert tree(root) == before
    assert "\n" not in str(info.value)
    return str(info.value)


def check(files: RunFiles, model_path=None, resume=None, overwrite=False) -> None:
    check_run_files(files, inputs={"--model-path": model_path, "--resume": resume}, resume=resume,
                    overwrite=overwrite)


# ---------------------------------------------------------------- --output names a file

@pytest.mark.parametrize("suffix", ["result/x/", "result/x/.", "result/x/..", "result/", "."])
def test_an_output_naming_a_folder_is_a_usage_error(tmp_path, suffix):
    message = refused(UsageError, "--output", tmp_path, RunFiles.for_output, f"{tmp_path}/{suffix}")
    assert "file name" in message


def test_an_existing_folder_as_output_is_refused_before_any_work(tmp_path):
    (tmp_path / "result" / "x").mkdir(parents=True)
    for output in (tmp_path / "result" / "x", tmp_path / "result"):
        message = refused(UsageError, "--output .* is an existing folder", tmp_path, RunFiles.for_output, str(output))
        assert f"{output}/model.pt" in message


def test_last_metrics_and_lock_go_beside_the_best_model(tmp_path):
    files = RunFiles.for_output(str(tmp_path / "r" / "best.pt"))
    assert (files.last, files.metrics, files.lock) == (tmp_path / "r" / "last.pt", tmp_path / "r" / "metrics.json",
                                                       tmp_path / "r" / ".lock")


# ---------------------------------------------------------------- outputs never collide

@pytest.mark.parametrize("name,role", [("last.pt", "last.pt"), ("metrics.json", "metrics.json"),
                                       (".lock", "the lock file")])
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_best_model_never_takes_another_outputs_place(tmp_path, name, role, overwrite):
    files = RunFiles.for_output(str(tmp_path / "result" / "x" / name))
    message = refused(UsageError, f"--output .* keeps {role}", tmp_path, check, files, overwrite=overwrite)
    assert str(tmp_path / "result" / "x" / "model.pt") in message


def test_an_output_that_links_to_another_output_collides(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"last")
    (folder / "best.pt").symlink_to("last.pt")
    (folder / "m.pt").symlink_to("metrics.json")  # a link to a file that does not exist yet
    for name in ("best.pt", "m.pt"):
        refused(UsageError, "--output .* keeps", tmp_path, check, RunFiles.for_output(str(folder / name)),
                overwrite=True)


# ---------------------------------------------------------------- inputs are never replaced

@pytest.mark.parametrize("overwrite", [False, True])
def test_output_equal_to_the_model_path_is_refused_even_with_overwrite(tmp_path, overwrite):
    model = tmp_path / "x" / "model.pt"
    make_run(tmp_path / "x")
    for spelling in (model, Path(os.path.relpath(model))):
        refused(UsageError, "--output .* is the --model-path input; an input is never replaced", tmp_path,
                check, RunFiles.for_output(str(model)), model_path=spelling, overwrite=overwrite)


@pytest.mark.parametrize("name", ["last.pt", "metrics.json"])
def test_a_model_path_in_the_output_folder_is_never_replaced_even_with_overwrite(tmp_path, name):
    make_run(tmp_path / "x")
    message = refused(UsageError, "--model-path input", tmp_path, check,
                      RunFiles.for_output(str(tmp_path / "x" / "other.pt")),
                      model_path=tmp_path / "x" / name, overwrite=True)
    assert f"writes {name} to" in message


def test_a_link_or_hard_link_to_the_output_is_the_same_input(tmp_path):
    make_run(tmp_path / "x")
    (tmp_path / "soft.pt").symlink_to(tmp_path / "x" / "model.pt")
    os.link(tmp_path / "x" / "last.pt", tmp_path / "hard.pt")
    files = RunFiles.for_output(str(tmp_path / "x" / "model.pt"))
    for source in (tmp_path / "soft.pt", tmp_path / "hard.pt"):
        refused(UsageError, "--model-path input", tmp_path, check, files, model_path=source, overwrite=True)


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_equal_to_resume_is_refused(tmp_path, overwrite):
    resume = tmp_path / "saved" / "run.pt"  # a last.pt the user renamed
    resume.parent.mkdir()
    resume.write_bytes(b"resumable")
    refused(UsageError, "--output .* is the --resume input", tmp_path, check,
            RunFiles.for_output(str(resume)), resume=resume, overwrite=overwrite)


# ---------------------------------------------------------------- earlier results need --overwrite

@pytest.mark.parametrize("existing", ["model.pt", "last.pt", "metrics.json"])
def test_each_existing_result_needs_overwrite(tmp_path, existing):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / existing).write_bytes(b"earlier")
    files = RunFiles.for_output(str(folder / "model.pt"))
    message = refused(UsageError, "--output: .* already exists; pass --overwrite", tmp_path, check, files)
    assert str(folder / existing) in message
    check(files, overwrite=True)


def test_a_resumed_run_continues_in_its_own_folder_without_overwrite(tmp_path):
    files = make_run(tmp_path / "x")
    (tmp_path / "alias").symlink_to(tmp_path / "x")
    before = tree(tmp_path)
    for spelling in (files.last, Path(os.path.relpath(files.last)), tmp_path / "alias" / "last.pt"):
        check(files, resume=spelling)
        assert outputs.resumes_in_place(files, spelling)
    assert tree(tmp_path) == before
    assert not outputs.resumes_in_place(files, None)
    assert not outputs.resumes_in_place(make_run(tmp_path / "y"), files.last)


def test_resume_elsewhere_never_replaces_another_runs_files_without_overwrite(tmp_path):
    run_a, run_b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    message = refused(UsageError, "--output: .* already exists and is not part of the resumed run", tmp_path,
                      check, run_b, resume=run_a.last)
    assert "--overwrite" in message and str(run_a.last) in message
    check(run_b, resume=run_a.last, overwrite=True)  # the user said so
    check(RunFiles.for_output(str(tmp_path / "c" / "model.pt")), resume=run_a.last)  # a fresh folder


def test_an_output_file_that_is_a_folder_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "x" / "last.pt").mkdir(parents=True)
    refused(UsageError, "--output: .*last.pt is a folder", tmp_path, check,
            RunFiles.for_output(str(tmp_path / "x" / "model.pt")), overwrite=True)


# ---------------------------------------------------------------- folders that cannot be written

@pytest.mark.skipif(not PSEUDO_FS, reason="no /proc or /sys pseudo file system here")
@pytest.mark.parametrize("sub", ["fashion_ft_test/model.pt", "model.pt", "self/model.pt"])
def test_output_on_a_pseudo_file_system_cannot_be_written(sub):
    for root in PSEUDO_FS:
        with pytest.raises(UserError, match="--output: cannot write in .*: a pseudo file system") as info:
            check(RunFiles.for_output(f"{root}/{sub}"))
        assert "MiB" not in str(info.value)


@pytest.mark.parametrize("sub", ["model.pt", "deeper/model.pt"])
def test_a_file_where_the_output_folder_goes_is_refused(tmp_path, sub):
    (tmp_path / "notes.txt").write_text("a file")
    message = refused(UsageError, "--output: cannot create the folder", tmp_path, check,
                      RunFiles.for_output(str(tmp_path / "notes.txt" / sub)))
    assert f"{tmp_path / 'notes.txt'} is a file" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_a_read_only_output_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        refused(UserError, "--output: cannot write in .*Permission denied", tmp_path, check,
                RunFiles.for_output(str(folder / "sub" / "model.pt")))
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("errno_,cause", [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system"),
                                           (errno.ENOSPC, "No space left on device")])
def test_a_folder_we_may_not_write_is_refused_with_one_line(tmp_path, monkeypatch, errno_, cause):
    """The probe's own error stands in for a folder that root would write anyway."""
    folder = tmp_path / "ro"
    folder.mkdir()

    def probe(dir):
        if Path(dir) == folder:
            raise OSError(errno_, os.strerror(errno_))
        return real_probe(dir=dir)

    real_probe = outputs.tempfile.TemporaryFile
    monkeypatch.setattr(outputs.tempfile, "TemporaryFile", probe)
    refused(UserError, f"--output: cannot write in {folder}: {cause}; choose another folder", tmp_path, check,
            RunFiles.for_output(str(folder / "model.pt")))
    refused(UserError, f"--logdir: cannot write in {folder}: {cause}", tmp_path, check_logdir, str(folder), "run")


@pytest.mark.parametrize("flag", ["--output", "--model-path", "--resume"])
def test_a_symlink_loop_is_a_usage_error_naming_the_flag(tmp_path, flag):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for looped in (tmp_path / "loop" / "model.pt", tmp_path / "a"):
        output = looped if flag == "--output" else tmp_path / "out" / "model.pt"
        source = None if flag == "--output" else looped
        inputs = {"--model-path": source if flag == "--model-path" else None,
                  "--resume": source if flag == "--resume" else None}
        refused(UsageError, f"{flag} .*symlink loop", tmp_path, check_run_files, RunFiles.for_output(str(output)),
                inputs=inputs, resume=inputs["--resume"], overwrite=True)


LOOP_REPORTS = {  # every check that meets a loop, with the flag and the path it reports
    "--output folder": (lambda t: check_run_files(RunFiles.for_output(str(t / "a" / "sub" / "m.pt")), inputs={},
                                                  resume=None, overwrite=False), "--output", "a/sub/m.pt"),
    "--logdir": (lambda t: check_logdir(str(t / "a"), "run"), "--logdir", "a"),
    "--logdir below": (lambda t: check_logdir(str(t / "a" / "sub"), None), "--logdir", "a/sub"),
    "--run-name": (lambda t: check_logdir(str(t), "a"), "--run-name", "a"),
    "writable folder": (lambda t: outputs.check_writable_folder(t / "a" / "sub", "--logdir"), "--logdir", "a/sub"),
    "lock folder": (lambda t: RunLock(t / "a" / "sub" / ".lock").__enter__(), "--output", "a/sub/.lock"),
    "lock file": (lambda t: RunLock(t / "x" / "self").__enter__(), "--output", "x/self"),
}


@pytest.mark.parametrize("where", LOOP_REPORTS)
def test_every_symlink_loop_is_reported_in_one_form(tmp_path, where):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "self").symlink_to("self")
    call, flag, path = LOOP_REPORTS[where]
    message = refused(UsageError, "symlink loop", tmp_path, call, tmp_path)
    assert message == f"{flag} {tmp_path / path}: symlink loop; point {flag} at a real path"


def test_a_good_output_passes_and_creates_nothing(tmp_path):
    before = tree(tmp_path)
    check(RunFiles.for_output(str(tmp_path / "result" / "new" / "model.pt")), model_path=tmp_path / "in.pt")
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- free space

def test_low_disk_space_names_the_folder_and_the_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda _path: usage(10**9, 10**9, 1024))
    with pytest.raises(UserError, match=r"--output: only 0.0 MiB free in .*not.*needs about 64 MiB"):
        check_disk_space(tmp_path / "not" / "yet", 64 * 2**20)
    check_disk_space(tmp_path / "not" / "yet", 1024)
    assert not (tmp_path / "not").exists()


# ---------------------------------------------------------------- --logdir and --run-name

@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs/run", "..", ".", ""])
def test_a_run_name_that_leaves_the_logdir_is_refused(tmp_path, name):
    refused(UsageError, "--run-name", tmp_path, check_logdir, str(tmp_path / "logs"), name)


@pytest.mark.parametrize("name", ["two\nlines", "cr\r", "esc\x1b[31mred", "tab\there", "nul\0", "del\x7f",
                                  "c1\x85", "line\u2028sep", "para\u2029sep", "undecodable\udcff"])
def test_a_run_name_with_a_control_character_is_refused_on_one_line(tmp_path, name):
    message = refused(UsageError, "--run-name .* control character", tmp_path, check_logdir, str(tmp_path), name)
    assert repr(name) in message and message.isprintable()


@pytest.mark.parametrize("name", ["run 1", "café_ü", "模型", "a-b.c_d~e"])
def test_a_run_name_of_printable_characters_is_kept(tmp_path, name):
    assert check_logdir(str(tmp_path), name) == tmp_path / name


def test_a_logdir_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    (tmp_path / "logs").write_text("a file")
    refused(UsageError, "--logdir .*logs is a file", tmp_path, check_logdir, str(tmp_path / "logs"), "run")
    refused(UsageError, "--logdir: cannot create the folder", tmp_path, check_logdir, str(tmp_path / "logs" / "sub"),
            "run")


def test_a_run_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run").write_text("a file")
    refused(UsageError, "--run-name run: .* is a file", tmp_path, check_logdir, str(tmp_path / "logs"), "run")


def test_a_logdir_on_a_full_disk_or_a_pseudo_file_system_is_refused(tmp_path, monkeypatch):
    if PSEUDO_FS:
        refused(UserError, "--logdir: cannot write in .*: a pseudo file system", tmp_path, check_logdir,
                f"{PSEUDO_FS[0]}/tb", "run")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda _path: usage(10**9, 10**9, 4096))
    refused(UserError, "--logdir: only 0.0 MiB free in .*logs/run; the run needs about 1 MiB", tmp_path, check_logdir,
            str(tmp_path / "logs"), "run")


def test_a_good_logdir_returns_the_run_folder_and_creates_nothing(tmp_path):
    before = tree(tmp_path)
    assert check_logdir(str(tmp_path / "logs"), "2024_run-1.a") == tmp_path / "logs" / "2024_run-1.a"
    assert check_logdir(str(tmp_path / "logs"), None) == tmp_path / "logs"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    refused(UsageError, "--logdir .*symlink loop", tmp_path, check_logdir, str(tmp_path / "loop"), "run")
    assert tree(tmp_path) == {**before, "loop": f"-> {tmp_path / 'loop'}"}


# ---------------------------------------------------------------- one live run per output folder

HOLD_LOCK = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from fashion_ft.outputs import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the lock until its stdin closes (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(REPO)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_lock_creates_the_folder_holds_our_pid_and_goes_at_exit(tmp_path):
    lock = tmp_path / "result" / "x" / ".lock"
    with RunLock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
        (lock.parent / "best.pt").write_bytes(b"saved")
    assert tree(tmp_path / "result") == {"x": "dir", "x/best.pt": tree(lock.parent)["best.pt"]}


@pytest.mark.parametrize("existing,written,left", [
    ([], [], []),  # failed before its first save: nothing left
    (["result"], [], ["result"]),  # a folder that was there before is not ours to remove
    ([], ["result/x/best.pt"], ["result", "result/x", "result/x/best.pt"]),
    ([], ["result/notes.txt"], ["result", "result/notes.txt"]),  # x goes, result holds a file
    ([], ["result/x/y/"], ["result", "result/x", "result/x/y"]),  # not empty: stop there
])
@pytest.mark.parametrize("fails", [False, True])
def test_the_folders_the_lock_made_go_at_exit_while_empty(tmp_path, existing, written, left, fails):
    for folder in existing:
        (tmp_path / folder).mkdir()
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        with RunLock(tmp_path / "result" / "x" / ".lock"):
            for path in written:
                target = tmp_path / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.mkdir() if path.endswith("/") else target.write_bytes(b"saved")
            if fails:
                raise RuntimeError("bad data")
    assert sorted(tree(tmp_path)) == left


def test_a_lock_that_fails_after_making_folders_leaves_none(tmp_path, monkeypatch):
    def denied(_self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(RunLock, "_take", denied)
    refused(UserError, "--output: cannot take the lock .*: Permission denied", tmp_path,
            RunLock(tmp_path / "new" / "x" / ".lock").__enter__)


NAMES = ("model[1].pt", "last.pt", "metrics.json")  # a best model's name with glob characters
STALE = {  # an entry beside the lock -> whether a run that takes the lock removes it
    ".last.pt.ab12cd_9.tmp": True, ".model[1].pt.q.tmp": True, ".metrics.json.x1y2z3w4.tmp": True,
    ".other.pt.ab12cd_9.tmp": False,  # another model's, of another run
    "last.pt": False, ".last.pt.tmp": False, ".last.pt.ab12cd_9": False, "last.pt.ab12cd_9.tmp": False,
    "notes.tmp": False, ".model1.pt.q.tmp": False,
    ".last.pt.dir.tmp/": False,  # a folder: never ours
    ".last.pt.link.tmp@": False,  # a link: never ours, nor what it points to
}


@pytest.mark.parametrize("entry,removed", STALE.items())
def test_taking_the_lock_removes_only_our_stale_temporaries(tmp_path, entry, removed):
    folder = tmp_path / "run"
    folder.mkdir()
    (tmp_path / "victim.pt").write_bytes(b"precious")
    name = entry.rstrip("/@")
    if entry.endswith("/"):
        (folder / name).mkdir()
    elif entry.endswith("@"):
        (folder / name).symlink_to(tmp_path / "victim.pt")
    else:
        (folder / name).write_bytes(b"half written")
    with RunLock(folder / ".lock", clean=NAMES):
        assert os.path.lexists(folder / name) != removed
    assert (tmp_path / "victim.pt").read_bytes() == b"precious"
    with RunLock(folder / ".lock"):  # the callers' RunLock(files.lock) removes nothing
        pass
    assert os.path.lexists(folder / name) != removed


def test_a_refused_lock_removes_no_temporaries(tmp_path):
    lock = tmp_path / "x" / ".lock"
    holder = hold_lock(lock)
    try:
        (lock.parent / ".last.pt.ab12cd_9.tmp").write_bytes(b"the live run is writing this")
        refused(UserError, "in use", tmp_path, RunLock(lock, clean=("last.pt",)).__enter__)
    finally:
        holder.communicate("")


def test_run_files_name_what_atomic_write_saves(tmp_path):
    files = RunFiles.for_output(str(tmp_path / "x" / "model[1].pt"))
    assert files.names() == ("model[1].pt", "last.pt", "metrics.json", "model[1].state_dict.pt")


def test_a_folder_held_by_a_live_run_is_refused(tmp_path):
    lock = tmp_path / "x" / ".lock"
    holder = hold_lock(lock)
    try:
        message = refused(UserError, f"--output folder {tmp_path / 'x'} is in use .*pid {holder.pid}", tmp_path,
                          RunLock(lock).__enter__)
        assert str(lock) in message
    finally:
        holder.communicate("")
    assert not lock.exists()
    with RunLock(lock):  # free again once the holder ended
        pass


def test_the_same_folder_twice_in_one_process_is_refused(tmp_path):
    with RunLock(tmp_path / ".lock"):
        with pytest.raises(UserError, match=f"in use .*pid {os.getpid()}"):
            RunLock(tmp_path / ".lock").__enter__()
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_killed_runs_lock_is_taken_again(tmp_path):
    """The kernel drops a dead holder's flock: its file, pid and all, is no lock any more."""
    lock = tmp_path / ".lock"
    holder = hold_lock(lock)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.read_text() == f"{holder.pid}\n"  # left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with RunLock(lock):
            assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


@pytest.mark.parametrize("created", [True, False])
def test_without_flock_the_created_file_is_the_lock(tmp_path, monkeypatch, created):
    lock = tmp_path / ".lock"
    if not created:
        lock.write_text("4242\n")  # a live run's, or a killed one's: without flock they look alike

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outputs.fcntl, "flock", no_flock)
    if not created:
        refused(UserError, "in use by a running fine-tuning run .pid 4242.*delete .*\\.lock", tmp_path,
                RunLock(lock).__enter__)
        return
    with pytest.warns(UserWarning, match="has no flock; should this run be killed, delete"):
        with RunLock(lock):
            assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    lock = tmp_path / ".lock"
    with pytest.raises(RuntimeError, match="diverged"):
        with RunLock(lock):
            raise RuntimeError("diverged")
    assert not lock.exists()
    with RunLock(lock):
        pass


def test_a_lock_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    refused(UserError, "--output: cannot take the lock .*file/.lock", tmp_path,
            RunLock(tmp_path / "file" / ".lock").__enter__)


def test_the_lock_never_writes_through_a_planted_link(tmp_path):
    (tmp_path / "victim.pt").write_bytes(b"precious")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / ".lock").symlink_to(tmp_path / "victim.pt")
    refused(UserError, "--output: cannot take the lock .*: it is a symlink, which the lock never follows; delete it",
            tmp_path, RunLock(tmp_path / "x" / ".lock").__enter__)


# ---------------------------------------------------------------- TensorBoard trouble mid-run

BREAK_WRITER = textwrap.dedent("""
    import resource, shutil, signal, sys, tempfile, warnings
    sys.path.insert(0, sys.argv[2])
    warnings.formatwarning = lambda message, *_args, **_kw: f"warning: {message}\\n"  # as the CLI does
    from fashion_ft import tblog

    folder = tempfile.mkdtemp()
    writer = tblog.open_writer(folder + "/run")
    tblog.log_config(writer, {"lr": 0.1})
    tblog.log_epoch(writer, 1, {"train_loss": 1.0})
    if sys.argv[1] == "removed":
        shutil.rmtree(folder)
    else:  # a file-size limit fails writes in the kernel as a full disk does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    for epoch in range(2, 80):
        tblog.log_epoch(writer, epoch, {"train_loss": 1.0, "val_acc": 0.5, "lr": 0.01})
    tblog.log_hparams(writer, {"lr": 0.1}, {"hparam/test_acc": 0.9})
    writer.close()
    print("training went on; logging active:", writer.active)
""")


@pytest.mark.parametrize("fault,reason", [("removed", "No such file or directory"), ("full", "File too large")])
def test_a_writer_failure_mid_run_is_one_warning_and_training_goes_on(fault, reason):
    result = subprocess.run([sys.executable, "-c", BREAK_WRITER, fault, str(REPO)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "training went on; logging active: False"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no "Exception in thread", no traceback
    assert lines[0].startswith(f"warning: TensorBoard logging stopped: {reason}")
    assert lines[0].endswith("training goes on")


def test_a_writer_that_cannot_start_warns_and_does_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.warns(UserWarning, match="TensorBoard logging stopped: .*file"):
        writer = tblog.open_writer(str(tmp_path / "file" / "run"))
    assert not writer.active
    tblog.log_epoch(writer, 1, {"train_loss": 1.0})
    writer.close()


def test_a_working_writer_logs_and_puts_the_thread_hook_back(tmp_path):
    hook = threading.excepthook
    with tblog.open_writer(str(tmp_path / "run")) as writer:
        assert threading.excepthook != hook
        tblog.log_epoch(writer, 1, {"train_loss": 1.0, "val_acc": 0.5})
        tblog.log_hparams(writer, {"lr": 0.1}, {"hparam/test_acc": 0.9})
        assert writer.active
    assert threading.excepthook == hook
    events = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100


# ---------------------------------------------------------------- per-class test accuracy

class Recorder:
    """The SafeWriter calls log_test_figures makes, kept."""

    def __init__(self):
        self.scalars, self.images = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = value

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.images[tag] = image


def test_a_class_without_test_images_has_no_accuracy_and_still_draws():
    import torch

    labels, preds = torch.tensor([1, 1, 2, 2]), torch.tensor([1, 2, 2, 9])
    writer = Recorder()
    per_class = tblog.log_test_figures(writer, torch.zeros(4, 28, 28, dtype=torch.uint8), labels, preds, CLASSES)
    assert per_class == {**dict.fromkeys(CLASSES), CLASSES[1]: 0.5, CLASSES[2]: 0.5}
    assert json.loads(json.dumps(per_class))[CLASSES[0]] is None  # null in metrics.json
    assert set(writer.scalars) == {"test_per_class/Trouser", "test_per_class/Pullover"}
    assert set(writer.images) == {"test/confusion_matrix", "test/per_class_accuracy", "test/misclassified"}


def test_a_class_without_accuracy_gets_no_bar():
    image = tblog.render_per_class([None, 0.5, 0.0], ["none", "half", "zero"])
    bars = [image[5 + i * 20:21 + i * 20, 110:470] for i in range(3)]
    blue = [int((bar == (70, 110, 200)).all(-1).sum()) for bar in bars]
    assert blue[0] == blue[2] < blue[1]  # no test images is drawn as an empty bar, as 0%
    assert not (bars[0] == bars[1]).all()


# ---------------------------------------------------------------- the scripts (need the trainer's wiring)

QUICK = (*SMALL_RUN, "--epochs", "1", "--limit-train", "256")


def one_line_error(result, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["last.pt", "metrics.json", ".lock"])
def test_cli_output_colliding_with_another_output_exits_2(tmp_path, small_data_dir, name):
    result = run_script("finetune_gpu.py", "--from-scratch", "--data-dir", small_data_dir,
                        "--output", tmp_path / "x" / name, "--logdir", tmp_path / "tb", *QUICK)
    one_line_error(result, 2, "--output")
    assert not (tmp_path / "x").exists() and not (tmp_path / "tb").exists()


@pytest.mark.slow
@pytest.mark.parametrize("make", ["folder", "slash"])
def test_cli_output_naming_a_folder_exits_2_before_any_work(tmp_path, small_data_dir, make):
    (tmp_path / "x").mkdir()
    output = str(tmp_path / "x") + ("/" if make == "slash" else "")
    result = run_script("finetune_gpu.py", "--from-scratch", "--data-dir", small_data_dir, "--output", output,
                        "--logdir", tmp_path / "tb", *QUICK)
    one_line_error(result, 2, "--output")
    assert tree(tmp_path) == {"x": "dir"}


@pytest.mark.slow
def test_cli_resume_elsewhere_keeps_another_runs_files(tmp_path, small_data_dir, trained_checkpoint):
    shutil.copytree(trained_checkpoint.parent, tmp_path / "a", ignore=shutil.ignore_patterns("tb"))
    shutil.copytree(trained_checkpoint.parent, tmp_path / "b", ignore=shutil.ignore_patterns("tb"))
    before = tree(tmp_path)
    result = run_script("finetune_gpu.py", "--resume", tmp_path / "a" / "last.pt", "--epochs", "3",
                        "--data-dir", small_data_dir, "--output", tmp_path / "b" / "model.pt",
                        "--logdir", tmp_path / "tb", "--quiet", "--device", "cpu")
    one_line_error(result, 2, "--output", "--overwrite")
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_cli_model_path_is_never_replaced_even_with_overwrite(tmp_path, small_data_dir, trained_checkpoint):
    shutil.copytree(trained_checkpoint.parent, tmp_path / "x", ignore=shutil.ignore_patterns("tb"))
    before = tree(tmp_path)
    result = run_script("finetune_gpu.py", "--model-path", tmp_path / "x" / "last.pt", "--overwrite",
                        "--data-dir", small_data_dir, "--output", tmp_path / "x" / "other.pt",
                        "--logdir", tmp_path / "tb", *QUICK)
    one_line_error(result, 2, "--output", "--model-path")
    assert tree(tmp_path) == before


@pytest.mark.slow
@pytest.mark.skipif(not PSEUDO_FS, reason="no /proc or /sys pseudo file system here")
def test_cli_output_on_a_pseudo_file_system_exits_1(tmp_path, small_data_dir):
    result = run_script("finetune_gpu.py", "--from-scratch", "--data-dir", small_data_dir,
                        "--output", f"{PSEUDO_FS[0]}/fashion_ft/model.pt", "--logdir", tmp_path / "tb", *QUICK)
    one_line_error(result, 1, "--output", "a pseudo file system")


@pytest.mark.slow
@pytest.mark.parametrize("flags,flag", [(("--logdir", "FILE"), "--logdir"),
                                        (("--run-name", "../escape"), "--run-name"),
                                        (("--run-name", "two\nlines\x1b[2J"), "--run-name")])
def test_cli_bad_logdir_or_run_name_exits_2_before_any_work(tmp_path, small_data_dir, flags, flag):
    (tmp_path / "file").write_text("x")
    args = [str(tmp_path / "file") if a == "FILE" else a for a in flags]
    if flag != "--logdir":
        args += ["--logdir", str(tmp_path / "tb")]
    result = run_script("finetune_gpu.py", "--from-scratch", "--data-dir", small_data_dir,
                        "--output", tmp_path / "out" / "model.pt", *args, *QUICK)
    one_line_error(result, 2, flag)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()


@pytest.mark.slow
def test_cli_a_second_run_on_a_live_runs_folder_exits_1(tmp_path, small_data_dir):
    holder = hold_lock(tmp_path / "x" / ".lock")
    try:
        result = run_script("finetune_gpu.py", "--from-scratch", "--data-dir", small_data_dir,
                            "--output", tmp_path / "x" / "model.pt", "--logdir", tmp_path / "tb", *QUICK)
    finally:
        holder.communicate("")
    one_line_error(result, 1, "--output", f"pid {holder.pid}")
    assert tree(tmp_path / "x") == {}


@pytest.mark.slow
@pytest.mark.parametrize("flags,code,needle", [(("--data-dir", "MISSING"), 1, "train files not found"),
                                               (("--limit-train", "100000"), 2, "--limit-train 100000 exceeds")])
def test_cli_a_run_that_fails_before_its_first_save_leaves_no_folders(tmp_path, small_data_dir, flags, code, needle):
    args = [str(tmp_path / "nowhere") if a == "MISSING" else a for a in flags]
    result = run_script("finetune_gpu.py", "--from-scratch", "--data-dir", small_data_dir,
                        "--output", tmp_path / "new" / "x" / "model.pt", "--logdir", tmp_path / "tb", *QUICK, *args)
    one_line_error(result, code, needle)
    assert tree(tmp_path) == {}


@pytest.mark.slow
def test_cli_a_class_missing_from_the_test_set_has_null_accuracy(tmp_path, small_data_dir):
    for split in ("train", "test"):
        images, labels = read_split(small_data_dir, split)
        keep = labels != 0 if split == "test" else labels >= 0
        write_split(tmp_path / "data", split, images[keep].numpy(), labels[keep].numpy())
    result = run_script("finetune_gpu.py", "--from-scratch", "--data-dir", tmp_path / "data",
                        "--output", tmp_path / "x" / "model.pt", "--logdir", tmp_path / "tb", *QUICK)
    assert result.returncode == 0, result.stderr
    per_class = json.loads((tmp_path / "x" / "metrics.json").read_text())["per_class_test_acc"]
    assert per_class[CLASSES[0]] is None
    assert all(isinstance(per_class[name], float) for name in CLASSES[1:])
