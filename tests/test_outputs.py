"""A run's files: outputs never collide with each other or with an input, only a regular file is ever
replaced, earlier results are kept without --overwrite, folders are checked up front, and one live run
per output folder (TensorBoard trouble mid-run: test_tblog.py).

Every refusal is checked for the flag it names and for leaving the file tree exactly as it was.
Permission bits do not stop root (CI runs the tests as root): the chmod test skips there, and the
"cannot write" message is also tested with the write probe patched to fail."""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import REPO, SMALL_RUN, run_script, write_split

from fashion_ft import outputs
from fashion_ft.data import CLASSES, read_split
from fashion_ft.errors import UsageError, UserError
from fashion_ft.outputs import RunFiles, RunLock, check_disk_space, check_logdir, check_run_files

PSEUDO_FS = [p for p in ("/proc", "/sys") if os.path.isdir(p) and shutil.disk_usage(p).total == 0]


def tree(folder: Path) -> dict:
    """Every entry under folder: sha256 of files, the target of links, 'dir' for folders, the type and
    permissions of anything else (never read: a pipe would block, a device might never end)."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            rel, mode = str(path.relative_to(folder)), path.lstat().st_mode
            if stat.S_ISLNK(mode):
                state[rel] = "-> " + os.readlink(path)
            elif stat.S_ISDIR(mode):
                state[rel] = "dir"
            elif stat.S_ISREG(mode):
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[rel] = stat.filemode(mode)
    return state


def make(folder: Path, entries) -> None:
    """'name/': an empty folder; 'name/file': a folder holding a file (another run's events);
    'name': a file; 'name@target': a symlink to target; 'name|': a named pipe."""
    folder.mkdir(exist_ok=True)
    for entry in entries:
        path = folder / entry.split("@")[0].rstrip("|")
        path.parent.mkdir(parents=True, exist_ok=True)
        if "@" in entry:
            path.symlink_to(entry.split("@")[1])
        elif entry.endswith("|"):
            os.mkfifo(path)
        elif entry.endswith("/"):
            path.mkdir()
        else:
            path.write_bytes(b"events")


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


def output(path: Path, plain: bool = True) -> RunFiles:
    return RunFiles.for_output(str(path), plain=plain)


# ---------------------------------------------------------------- --output names a file

FOLDER_OUTPUTS = {  # an --output under tmp_path that names a folder -> what the refusal says of it
    **dict.fromkeys(["result/x/", "result/x/.", "result/x/..", "result/", "."], "names a folder"),
    **dict.fromkeys(["result/x", "result"], "is an existing folder"),
}


@pytest.mark.parametrize("name,fault", FOLDER_OUTPUTS.items())
def test_an_output_naming_a_folder_is_a_usage_error_that_shows_a_file_name(tmp_path, name, fault):
    if fault == "is an existing folder":
        (tmp_path / "result" / "x").mkdir(parents=True)
    path = f"{tmp_path}/{name}"
    message = refused(UsageError, f"--output .* {fault}; give the best model's file name", tmp_path,
                      RunFiles.for_output, path)
    assert message.endswith(f"e.g. --output {os.path.join(path, 'model.pt')}")


def test_the_other_files_go_beside_the_best_model(tmp_path):
    files = output(tmp_path / "r" / "model[1].pt")  # a name with glob characters
    assert (files.last, files.metrics, files.lock, files.plain) == tuple(
        tmp_path / "r" / name for name in ("last.pt", "metrics.json", ".lock", "model[1].state_dict.pt"))
    assert files.names() == ("model[1].pt", "last.pt", "metrics.json", "model[1].state_dict.pt")  # atomic_write's
    files = output(tmp_path / "r" / "model.pt", plain=False)  # a run whose input was no plain state_dict
    assert files.plain is None and "plain" not in files.roles()
    assert files.names() == ("model.pt", "last.pt", "metrics.json")


# ---------------------------------------------------------------- outputs never collide

@pytest.mark.parametrize("name,role", [("last.pt", "last.pt"), ("metrics.json", "metrics.json"),
                                       (".lock", "the lock file")])
@pytest.mark.parametrize("overwrite", [False, True])
def test_the_best_model_never_takes_another_outputs_place(tmp_path, name, role, overwrite):
    message = refused(UsageError, f"--output .* keeps {role}", tmp_path, check,
                      output(tmp_path / "result" / "x" / name), overwrite=overwrite)
    assert str(tmp_path / "result" / "x" / "model.pt") in message


# ---------------------------------------------------------------- inputs are never replaced

INPUT_COLLISIONS = {  # --output, the input (under tmp_path; "rel:" spelled relative to the cwd) -> the refusal
    "model path is the output": ("x/model.pt", {"model_path": "x/model.pt"},
                                 "--output .* is the --model-path input; an input is never replaced"),
    "model path spelled relative": ("x/model.pt", {"model_path": "rel:x/model.pt"},
                                    "--output .* is the --model-path input; an input is never replaced"),
    "model path is last.pt": ("x/other.pt", {"model_path": "x/last.pt"},
                              "--output .*: the run writes last.pt to .*, which is the --model-path input"),
    "model path is metrics.json": ("x/other.pt", {"model_path": "x/metrics.json"},
                                   "--output .*: the run writes metrics.json to .*, which is the --model-path input"),
    "a link to the output": ("x/model.pt", {"model_path": "soft.pt"}, "is the --model-path input"),
    "a hard link to last.pt": ("x/model.pt", {"model_path": "hard.pt"}, "writes last.pt to .*--model-path input"),
    "resume is the output": ("saved/run.pt", {"resume": "saved/run.pt"}, "--output .* is the --resume input"),
    "model path is the plain state_dict": ("x/model.pt", {"model_path": "x/model.state_dict.pt"},
                                           "writes the best model as a plain state_dict to .*--model-path input"),
}


@pytest.mark.parametrize("case", INPUT_COLLISIONS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_input_is_never_replaced_even_with_overwrite(tmp_path, case, overwrite):
    best, inputs, fault = INPUT_COLLISIONS[case]
    make_run(tmp_path / "x")
    make(tmp_path, ["soft.pt@x/model.pt", "saved/run.pt"])  # saved/run.pt: a last.pt the user renamed
    os.link(tmp_path / "x" / "last.pt", tmp_path / "hard.pt")
    inputs = {flag: Path(os.path.relpath(tmp_path / path[4:])) if path.startswith("rel:") else tmp_path / path
              for flag, path in inputs.items()}
    refused(UsageError, fault, tmp_path, check, output(tmp_path / best), overwrite=overwrite, **inputs)


# ---------------------------------------------------------------- earlier results need --overwrite

@pytest.mark.parametrize("existing", ["model.pt", "last.pt", "metrics.json", "model.state_dict.pt"])
def test_each_existing_result_needs_overwrite(tmp_path, existing):
    make(tmp_path / "x", [existing])
    files = output(tmp_path / "x" / "model.pt")
    message = refused(UsageError, "--output: .* already exists; pass --overwrite", tmp_path, check, files)
    assert str(tmp_path / "x" / existing) in message
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
    check(output(tmp_path / "c" / "model.pt"), resume=run_a.last)  # a fresh folder


@pytest.mark.parametrize("existing", ["model.state_dict.pt", "model.state_dict.pt|"])
def test_a_plain_state_dict_the_run_does_not_write_is_neither_checked_nor_in_the_way(tmp_path, existing):
    make(tmp_path / "x", [existing])
    check(output(tmp_path / "x" / "model.pt", plain=False))


def bind_socket(path: Path) -> None:
    """A unix socket at path, bound by its name alone: a socket's whole path must be short."""
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(cwd)


def full_device(path: Path) -> None:
    """A copy of /dev/full (writes fail, reads never end), as root may make one."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("mknod needs root")


NOT_FILES = {  # what stands where the run writes a file -> (how the refusal names it, how to make it)
    "folder": ("a folder", os.mkdir),
    "link to a file": ("a symlink", lambda p: p.symlink_to("../victim.pt")),
    "link to another output": ("a symlink", lambda p: p.symlink_to({"last.pt": "metrics.json"}.get(p.name, "last.pt"))),
    "named pipe": ("a named pipe", os.mkfifo),
    "socket": ("a socket", bind_socket),
    "device": ("a character device", full_device),
}
FILE_ROLES = {"model.pt": "the best model", "last.pt": "last.pt", "metrics.json": "metrics.json",
              "model.state_dict.pt": "the best model as a plain state_dict", ".lock": "the lock file"}


@pytest.mark.parametrize("name,kind", [(name, kind) for name in FILE_ROLES for kind in NOT_FILES
                                       if (name, kind) != ("model.pt", "folder")])  # that one: FOLDER_OUTPUTS
@pytest.mark.parametrize("overwrite", [False, True])
def test_anything_but_a_regular_file_where_the_run_writes_is_refused_even_with_overwrite(tmp_path, name, kind,
                                                                                           overwrite):
    what, plant = NOT_FILES[kind]
    make(tmp_path, ["victim.pt", "x/"])
    plant(tmp_path / "x" / name)
    message = refused(UsageError, f"--output: {tmp_path / 'x' / name} is {what}, but the run writes "
                      f"{FILE_ROLES[name]} there", tmp_path, check, output(tmp_path / "x" / "model.pt"),
                      overwrite=overwrite)
    assert message.endswith("not even with --overwrite; choose another --output")


def test_the_systems_own_device_as_output_is_refused(tmp_path):
    refused(UsageError, f"--output: {os.devnull} is a character device", tmp_path, check, output(Path(os.devnull)),
            overwrite=True)
    assert stat.S_ISCHR(os.lstat(os.devnull).st_mode)


def test_with_overwrite_only_the_files_the_run_writes_are_removed(tmp_path):
    """claim_outputs clears an earlier run's files, never a plain state_dict that this run will not write."""
    import torch

    from fashion_ft.config import Config
    from fashion_ft.trainer import StartModel, claim_outputs

    make(tmp_path / "x", ["model.pt", "last.pt", "metrics.json", "model.state_dict.pt"])
    start = StartModel(torch.nn.Linear(2, 2), "cnn3", {})
    with contextlib.ExitStack() as stack:
        claim_outputs(Config(overwrite=True), output(tmp_path / "x" / "model.pt", plain=False), start, stack)
        assert sorted(os.listdir(tmp_path / "x")) == [".lock", "model.state_dict.pt"]


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
                      output(tmp_path / "notes.txt" / sub))
    assert f"{tmp_path / 'notes.txt'} is a file" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_a_read_only_output_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        refused(UserError, "--output: cannot write in .*Permission denied", tmp_path, check,
                output(folder / "sub" / "model.pt"))
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
            output(folder / "model.pt"))
    refused(UserError, f"--logdir: cannot write in {folder}: {cause}", tmp_path, check_logdir, str(folder), "run")


LOOP_REPORTS = {  # every check that meets a loop (a <-> b, x/self -> self), with the flag and the path it reports
    "--output": (lambda t: check(output(t / "a")), "--output", "a"),
    "--output below a loop": (lambda t: check(output(t / "x" / "self" / "m.pt")), "--output", "x/self/m.pt"),
    "--output folder": (lambda t: check(output(t / "a" / "sub" / "m.pt")), "--output", "a/sub/m.pt"),
    "--model-path": (lambda t: check(output(t / "out" / "m.pt"), model_path=t / "a"), "--model-path", "a"),
    "--model-path below a loop": (lambda t: check(output(t / "out" / "m.pt"), model_path=t / "x" / "self" / "m.pt"),
                                  "--model-path", "x/self/m.pt"),
    "--resume": (lambda t: check(output(t / "out" / "m.pt"), resume=t / "a"), "--resume", "a"),
    "--resume below a loop": (lambda t: check(output(t / "out" / "m.pt"), resume=t / "x" / "self" / "m.pt"),
                              "--resume", "x/self/m.pt"),
    "--logdir": (lambda t: check_logdir(str(t / "a"), "run"), "--logdir", "a"),
    "--logdir below": (lambda t: check_logdir(str(t / "a" / "sub"), None), "--logdir", "a/sub"),
    "--run-name": (lambda t: check_logdir(str(t), "a"), "--run-name", "a"),
    "writable folder": (lambda t: outputs.check_writable_folder(t / "a" / "sub", "--logdir"), "--logdir", "a/sub"),
    "lock folder": (lambda t: RunLock(t / "a" / "sub" / ".lock").__enter__(), "--output", "a/sub/.lock"),
    "lock file": (lambda t: RunLock(t / "x" / "self").__enter__(), "--output", "x/self"),
}


@pytest.mark.parametrize("where", LOOP_REPORTS)
def test_every_symlink_loop_is_a_usage_error_in_one_form_naming_the_flag(tmp_path, where):
    make(tmp_path, ["a@b", "b@a", "x/self@self"])
    call, flag, path = LOOP_REPORTS[where]
    message = refused(UsageError, "symlink loop", tmp_path, call, tmp_path)
    assert message == f"{flag} {tmp_path / path}: symlink loop; point {flag} at a real path"


def test_a_good_output_passes_and_creates_nothing(tmp_path):
    before = tree(tmp_path)
    check(output(tmp_path / "result" / "new" / "model.pt"), model_path=tmp_path / "in.pt")
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

BAD_RUN_NAMES = {  # a --run-name -> what the refusal says of it
    "": "give a plain folder name",
    **dict.fromkeys(["../escape", "a/b", "/abs/run", "..", "."], "would leave --logdir"),
    **dict.fromkeys(["two\nlines", "cr\r", "esc\x1b[31mred", "tab\there", "nul\0", "del\x7f", "c1\x85",
                     "line\u2028sep", "para\u2029sep", "undecodable\udcff"], "has a control character"),
}


@pytest.mark.parametrize("name,fault", BAD_RUN_NAMES.items())
def test_a_run_name_that_is_not_a_plain_folder_name_is_refused_on_one_printable_line(tmp_path, name, fault):
    message = refused(UsageError, "--run-name", tmp_path, check_logdir, str(tmp_path / "logs"), name)
    assert message.startswith(f"--run-name {name!r}") and fault in message and message.isprintable()


@pytest.mark.parametrize("name", ["run 1", "café_ü", "模型", "a-b.c_d~e"])
def test_a_run_name_of_printable_characters_is_kept(tmp_path, name):
    assert check_logdir(str(tmp_path), name) == tmp_path / name


@pytest.mark.parametrize("entries,logdir,fault", [
    (["logs"], "logs", "--logdir .*logs is a file; TensorBoard needs a folder"),
    (["logs"], "logs/sub", "--logdir: cannot create the folder"),
    (["logs/run"], "logs", "--run-name run: .*run is a file; TensorBoard needs a folder"),
])
def test_a_file_where_a_log_folder_goes_is_refused(tmp_path, entries, logdir, fault):
    make(tmp_path, entries)
    refused(UsageError, fault, tmp_path, check_logdir, str(tmp_path / logdir), "run")


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


@pytest.mark.parametrize("existing,written,left", [
    ([], [], []),  # failed before its first save: nothing left
    (["result"], [], ["result"]),  # a folder that was there before is not ours to remove
    ([], ["result/x/best.pt"], ["result", "result/x", "result/x/best.pt"]),
    ([], ["result/notes.txt"], ["result", "result/notes.txt"]),  # x goes, result holds a file
    ([], ["result/x/y/"], ["result", "result/x", "result/x/y"]),  # not empty: stop there
])
@pytest.mark.parametrize("fails", [False, True])
def test_the_lock_holds_our_pid_and_its_folders_go_at_exit_while_empty(tmp_path, existing, written, left, fails):
    lock = tmp_path / "result" / "x" / ".lock"
    for folder in existing:
        (tmp_path / folder).mkdir()
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        with RunLock(lock):
            assert lock.read_text() == f"{os.getpid()}\n"
            for path in written:
                target = tmp_path / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.mkdir() if path.endswith("/") else target.write_bytes(b"saved")
            if fails:
                raise RuntimeError("bad data")
    assert sorted(tree(tmp_path)) == left
    with RunLock(lock):  # and free again
        pass


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
    ".last.pt.link.tmp@../victim.pt": False,  # a link: never ours, nor what it points to
}


@pytest.mark.parametrize("entry,removed", STALE.items())
def test_taking_the_lock_removes_only_our_stale_temporaries(tmp_path, entry, removed):
    make(tmp_path, ["victim.pt", f"run/{entry}"])
    folder, name = tmp_path / "run", entry.split("@")[0].rstrip("/")
    with RunLock(folder / ".lock", clean=NAMES):
        assert os.path.lexists(folder / name) != removed
    assert (tmp_path / "victim.pt").read_bytes() == b"events"
    with RunLock(folder / ".lock"):  # the callers' RunLock(files.lock) removes nothing
        pass
    assert os.path.lexists(folder / name) != removed


def test_a_folder_held_by_a_live_run_is_refused_and_keeps_its_temporaries(tmp_path):
    lock = tmp_path / "x" / ".lock"
    holder = hold_lock(lock)
    try:
        (lock.parent / ".last.pt.ab12cd_9.tmp").write_bytes(b"the live run is writing this")
        message = refused(UserError, f"--output folder {tmp_path / 'x'} is in use .*pid {holder.pid}", tmp_path,
                          RunLock(lock, clean=("last.pt",)).__enter__)
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
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outputs.fcntl, "flock", no_flock)
    lock = tmp_path / ".lock"
    if created:
        with pytest.warns(UserWarning, match="has no flock; should this run be killed, delete"):
            with RunLock(lock):
                assert lock.read_text() == f"{os.getpid()}\n"
        assert not lock.exists()
    else:
        lock.write_text("4242\n")  # a live run's, or a killed one's: without flock they look alike
        refused(UserError, "in use by a running fine-tuning run .pid 4242.*delete .*\\.lock", tmp_path,
                RunLock(lock).__enter__)


def test_an_unexpected_flock_error_is_one_line_and_leaves_no_lock_file(tmp_path, monkeypatch):
    def failing_flock(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(outputs.fcntl, "flock", failing_flock)
    refused(UserError, re.escape(f"--output: cannot take the lock {tmp_path / 'run/.lock'}: Input/output error"),
            tmp_path, RunLock(tmp_path / "run/.lock").__enter__)


@pytest.mark.parametrize("entries,lock,cause", [
    (["file"], "file/.lock", "Not a directory"),
    (["victim.pt", "x/.lock@../victim.pt"], "x/.lock", "it is a symlink, which the lock never follows; delete it"),
])
def test_a_lock_that_cannot_be_taken_is_one_line_and_writes_nothing(tmp_path, entries, lock, cause):
    make(tmp_path, entries)
    refused(UserError, re.escape(f"--output: cannot take the lock {tmp_path / lock}: {cause}"), tmp_path,
            RunLock(tmp_path / lock).__enter__)


# ---------------------------------------------------------------- the scripts (need the trainer's wiring)

QUICK = (*SMALL_RUN, "--epochs", "1", "--limit-train", "256")


def one_line_error(result, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


CLI_USAGE_ERRORS = {  # a wrong command line ({t}: tmp_path, holding x/, file, pipe; a later --logdir wins) -> its flag
    "--output is last.pt": (("--output", "{t}/x/last.pt"), "--output"),
    "--output is metrics.json": (("--output", "{t}/x/metrics.json"), "--output"),
    "--output is the lock": (("--output", "{t}/x/.lock"), "--output"),
    "--output is a folder": (("--output", "{t}/x"), "--output"),
    "--output ends in a slash": (("--output", "{t}/x/"), "--output"),
    "--output is a named pipe": (("--output", "{t}/pipe", "--overwrite"), "--output"),
    "--logdir is a file": (("--output", "{t}/out/model.pt", "--logdir", "{t}/file"), "--logdir"),
    "--run-name leaves --logdir": (("--output", "{t}/out/model.pt", "--run-name", "../escape"), "--run-name"),
    "--run-name breaks the line": (("--output", "{t}/out/model.pt", "--run-name", "two\nlines\x1b[2J"), "--run-name"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_USAGE_ERRORS)
def test_cli_a_wrong_command_line_exits_2_before_any_work(tmp_path, small_data_dir, case):
    flags, flag = CLI_USAGE_ERRORS[case]
    make(tmp_path, ["x/", "file", "pipe|"])
    before = tree(tmp_path)
    result = run_script("finetune_gpu.py", "--from-scratch", "--data-dir", small_data_dir, "--logdir", tmp_path / "tb",
                        *[a.format(t=tmp_path) for a in flags], *QUICK)
    one_line_error(result, 2, flag)
    assert tree(tmp_path) == before


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
@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_cli_a_run_from_our_checkpoint_leaves_a_plain_state_dict_alone(tmp_path, small_data_dir, trained_checkpoint,
                                                                       overwrite):
    """Only a run from a plain state_dict writes one: another's, by the best model's name, is the user's."""
    make(tmp_path, ["x/model.state_dict.pt"])
    result = run_script("finetune_gpu.py", "--model-path", trained_checkpoint, *overwrite, "--data-dir", small_data_dir,
                        "--output", tmp_path / "x" / "model.pt", "--logdir", tmp_path / "tb", *QUICK)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x" / "model.state_dict.pt").read_bytes() == b"events"


@pytest.mark.slow
def test_cli_a_resumed_run_never_replaces_its_original_model_path(tmp_path, small_data_dir, trained_checkpoint):
    """The resumed run's --model-path, restored from last.pt, is an input as much as --resume."""
    shutil.copy(trained_checkpoint, tmp_path / "in.pt")
    first = run_script("finetune_gpu.py", "--model-path", tmp_path / "in.pt", "--data-dir", small_data_dir,
                       "--output", tmp_path / "a" / "model.pt", "--logdir", tmp_path / "tb", *QUICK)
    assert first.returncode == 0, first.stderr
    before = tree(tmp_path)
    result = run_script("finetune_gpu.py", "--resume", tmp_path / "a" / "last.pt", "--epochs", "2", "--overwrite",
                        "--output", tmp_path / "in.pt", "--quiet", "--device", "cpu")
    one_line_error(result, 2, "--output", "--model-path")
    assert tree(tmp_path) == before


@pytest.mark.slow
@pytest.mark.skipif(not PSEUDO_FS, reason="no /proc or /sys pseudo file system here")
def test_cli_output_on_a_pseudo_file_system_exits_1(tmp_path, small_data_dir):
    result = run_script("finetune_gpu.py", "--from-scratch", "--data-dir", small_data_dir,
                        "--output", f"{PSEUDO_FS[0]}/fashion_ft/model.pt", "--logdir", tmp_path / "tb", *QUICK)
    one_line_error(result, 1, "--output", "a pseudo file system")


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
