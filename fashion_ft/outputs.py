"""Guards for a run's files, checked before any work and without creating anything: where the best
model, last.pt, metrics.json and the lock go, that they never replace an input or earlier results,
that the folders can be written; and the lock that keeps two live runs out of one output folder.

Exit codes follow one rule:
- UsageError (exit 2): the command line is what is wrong, and changing it is the fix. A path that is
  malformed (a trailing '/', a --run-name that leaves --logdir), names the wrong kind of thing (a
  folder where a file goes, a file where a folder goes), cannot be resolved (a symlink loop), collides
  with another output or with an input, or would replace earlier results without --overwrite.
- UserError (exit 1): the command line is fine but the file system cannot take the run now: no
  permission, a read-only or pseudo file system (/proc, /sys), too little free space, or an output
  folder that a live run holds.
"""

import errno
import fcntl
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError, UserError

LOCK_NAME = ".lock"
LOGDIR_MIN_FREE_BYTES = 1 << 20  # TensorBoard's event files of one run are far smaller than this
ROLES = {"best": "the best model", "last": "last.pt", "metrics": "metrics.json", "lock": "the lock file"}


@dataclass(frozen=True)
class RunFiles:
    """The files one run writes: the best model at --output, the others beside it."""

    best: Path
    last: Path
    metrics: Path
    lock: Path

    @classmethod
    def for_output(cls, output: str) -> "RunFiles":
        """Refuses (UsageError) an --output that names a folder rather than the best model's file."""
        name = os.path.basename(output)
        if not output or output.endswith(("/", os.sep)) or name in ("", ".", ".."):
            raise UsageError(f"--output {output!r} names a folder; give the best model's file name, "
                             f"e.g. --output {os.path.join(output, 'model.pt')}")
        best = Path(output)
        if best.is_dir():
            raise UsageError(f"--output {output} is an existing folder; give the best model's file name, "
                             f"e.g. --output {best / 'model.pt'}")
        folder = best.parent
        return cls(best, folder / "last.pt", folder / "metrics.json", folder / LOCK_NAME)

    def roles(self) -> dict[str, Path]:
        return {"best": self.best, "last": self.last, "metrics": self.metrics, "lock": self.lock}


# ---------------------------------------------------------------- paths

def resolve_path(path: Path, flag: str) -> Path:
    """The absolute path with every symlink followed; a symlink loop is a UsageError naming `flag`
    (Path.resolve raises RuntimeError for it before Python 3.13, and returns the looping path after)."""
    loop = f"{flag} {path}: symlink loop; point {flag} at a real path"
    try:
        resolved = Path(path).resolve()
    except RuntimeError:
        raise UsageError(loop) from None
    except OSError as exc:
        raise UsageError(loop if exc.errno == errno.ELOOP else f"{flag} {path}: {exc.strerror}") from None
    try:
        os.stat(resolved)
    except OSError as exc:  # not there yet is fine; what cannot be named is not
        if exc.errno == errno.ELOOP:
            raise UsageError(loop) from None
        if exc.errno == errno.ENAMETOOLONG:
            raise UsageError(f"{flag} {path}: file name too long") from None
    return resolved


def existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest ancestor that exists (what a mkdir -p would start from)."""
    path = Path(path).absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def same_file(a: Path, b: Path) -> bool:
    """a and b resolved: the same path, or two names of one existing file (a hard link, case folding)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def is_pseudo_fs(path: Path) -> bool:
    """/proc, /sys, devpts and the like report a total size of 0: they cannot hold our files."""
    return shutil.disk_usage(path).total == 0


def check_writable_folder(folder: Path, flag: str) -> Path:
    """`folder` exists or can be created, on a real file system, by us; returns its existing ancestor."""
    ancestor = existing_ancestor(folder)
    if not ancestor.is_dir():
        raise UsageError(f"{flag}: cannot create the folder {folder}: {ancestor} is a file, not a folder")
    if is_pseudo_fs(ancestor):
        raise UserError(f"{flag}: {ancestor} is on a pseudo file system (like /proc or /sys) that cannot hold "
                        "files; cannot write there, choose a folder on a disk")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        read_only = os.statvfs(ancestor).f_flag & os.ST_RDONLY
        cause = "the file system is read-only" if read_only else "permission denied"
        raise UserError(f"{flag}: cannot write in {ancestor}: {cause}")
    return ancestor


# ---------------------------------------------------------------- the run's files

def check_run_files(files: RunFiles, *, inputs: dict[str, Path | None], resume: Path | None,
                    overwrite: bool) -> None:
    """Refuse, before any work and creating nothing, outputs that collide with each other or with an
    input (never allowed, not even with --overwrite), existing results without --overwrite (except a
    resumed run continuing in its own folder: `resume` is then exactly `files.last`), and an output
    folder that cannot be written. `inputs` maps each flag to the file the run reads, None if unused."""
    outputs = {role: resolve_path(path, "--output") for role, path in files.roles().items()}
    check_outputs_apart(files, outputs)
    continuing = resumes_in_place(files, resume)
    for flag, path in inputs.items():
        if path is not None:
            check_input_kept(files, outputs, flag, resolve_path(path, flag), continuing and flag == "--resume")
    for role in ("best", "last", "metrics"):
        check_not_folder(files, role)
        if not overwrite and not continuing and os.path.lexists(files.roles()[role]):
            raise UsageError(existing_message(files.roles()[role], resume))
    check_writable_folder(files.best.parent, "--output")


def resumes_in_place(files: RunFiles, resume: Path | None) -> bool:
    """--resume names this run's own last.pt: the run continues its own files."""
    if resume is None:
        return False
    return same_file(resolve_path(Path(resume), "--resume"), resolve_path(files.last, "--output"))


def check_outputs_apart(files: RunFiles, outputs: dict[str, Path]) -> None:
    for role in ("last", "metrics", "lock"):
        if same_file(outputs["best"], outputs[role]):
            raise UsageError(f"--output {files.best} is where the run keeps {ROLES[role]}; give the best model "
                             f"another name, e.g. --output {files.best.parent / 'model.pt'}")
    if same_file(outputs["last"], outputs["metrics"]):  # only through a symlink planted in the folder
        raise UsageError(f"--output: {files.last} and {files.metrics} are one file; choose another folder")


def check_input_kept(files: RunFiles, outputs: dict[str, Path], flag: str, source: Path, in_place: bool) -> None:
    """An input is never written to; `in_place`: this is --resume continuing its own last.pt."""
    for role, target in outputs.items():
        if role == "last" and in_place:
            continue
        if same_file(source, target):
            where = "" if role == "best" else f": the run writes {ROLES[role]} to {files.roles()[role]}, which"
            raise UsageError(f"--output {files.best}{where} is the {flag} input; an input is never replaced, "
                             "not even with --overwrite: choose another --output")


def check_not_folder(files: RunFiles, role: str) -> None:
    path = files.roles()[role]
    if path.is_dir():
        raise UsageError(f"--output: {path} is a folder, but the run writes {ROLES[role]} there; "
                         "choose another --output")


def existing_message(path: Path, resume: Path | None) -> str:
    if resume is None:
        return f"--output: {path} already exists; pass --overwrite to replace it or choose another --output"
    return (f"--output: {path} already exists and is not part of the resumed run (--resume {resume} continues "
            f"in place only with an --output beside it); pass --overwrite to replace it or choose another --output")


def check_disk_space(folder: Path, needed_bytes: int, flag: str = "--output") -> None:
    """At least `needed_bytes` free where `folder` is or will be created."""
    ancestor = existing_ancestor(folder)
    usage = shutil.disk_usage(ancestor)
    if usage.total == 0:
        raise UserError(f"{flag}: {folder} is on a pseudo file system (like /proc or /sys) that cannot hold "
                        "files; cannot write there, choose a folder on a disk")
    if usage.free < needed_bytes:
        raise UserError(f"{flag}: only {usage.free / 2**20:.1f} MiB free in {folder}; the run needs about "
                        f"{needed_bytes / 2**20:.0f} MiB")


# ---------------------------------------------------------------- TensorBoard folder

def check_run_name(run_name: str) -> None:
    """One plain folder name: nothing that would put the run outside --logdir."""
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    if not run_name or "\0" in run_name:
        raise UsageError(f"--run-name {run_name!r}: give a plain folder name")
    if os.path.isabs(run_name) or any(s in run_name for s in seps) or run_name in (".", ".."):
        raise UsageError(f"--run-name {run_name!r} would leave --logdir; give a plain folder name "
                         "(no '/', no '..', not absolute)")


def check_logdir(logdir: str, run_name: str | None) -> Path:
    """Check --logdir and --run-name before any work, creating nothing; returns the run's folder.
    `run_name` None: only --logdir is checked (a generated default name is always a plain name)."""
    if not logdir:
        raise UsageError("--logdir is empty; give a folder")
    if run_name is not None:
        check_run_name(run_name)
    root = resolve_path(Path(logdir), "--logdir")
    if root.exists() and not root.is_dir():
        raise UsageError(f"--logdir {logdir} is a file; TensorBoard needs a folder")
    run = Path(logdir) / (run_name or "")
    if run_name is not None and resolve_path(run, "--run-name").exists() and not run.is_dir():
        raise UsageError(f"--run-name {run_name}: {run} is a file; TensorBoard needs a folder")
    ancestor = check_writable_folder(run, "--logdir")
    free = shutil.disk_usage(ancestor).free
    if free < LOGDIR_MIN_FREE_BYTES:
        raise UserError(f"--logdir {logdir}: no space left on the device (only {free / 2**20:.2f} MiB free)")
    return run


# ---------------------------------------------------------------- the lock

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 64, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def try_flock(fd: int) -> bool | None:
    """True: we hold it now; False: another open file holds it; None: the file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return True


def same_inode(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class RunLock:
    """`with RunLock(files.lock): ...` holds an output folder for one live run.

    The lock file holds the holder's pid, and the holder keeps an exclusive flock on it, which the
    kernel drops when the process dies however it dies. A second run is refused (UserError naming
    the folder and the pid) while the flock is held or the recorded pid is a live process other than
    ours; a lock left by a dead process is taken over with a warning. (Should an unrelated process
    reuse a dead holder's pid, the folder stays refused while it lives; the message names the file to
    delete.) The lock is removed at exit, also on exceptions. Taking it is the run's first write: it
    creates the output folder if needed. Under torchrun only rank 0 takes it.
    """

    def __init__(self, path: Path, flag: str = "--output"):
        self.path = Path(path)
        self.flag = flag
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(5):  # another run may remove or replace the file between our steps
                self._fd = self._acquire()
                if self._fd is not None:
                    return self
        except OSError as exc:
            raise UserError(f"{self.flag}: cannot take the lock {self.path}: {exc.strerror or exc}") from None
        raise UserError(f"{self.flag}: cannot take the lock {self.path}: other runs keep replacing it")

    def __exit__(self, *_exc) -> bool:
        if self._fd is not None:
            try:
                if same_inode(self._fd, self.path):
                    os.unlink(self.path)
            except OSError:
                pass  # the folder went away: nothing left to release but the descriptor
            os.close(self._fd)
            self._fd = None
        return False

    def _acquire(self) -> int | None:
        """Our descriptor holding the lock, None to retry, or a UserError while a live run holds it."""
        try:
            fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW), False  # never write through a link
            except FileNotFoundError:  # its holder just removed it
                return None
        try:
            return self._claim(fd, created)
        except BaseException:
            os.close(fd)
            raise

    def _claim(self, fd: int, created: bool) -> int | None:
        locked = try_flock(fd)
        pid = None if created else read_pid(fd)
        if locked is False or (pid is not None and pid != os.getpid() and pid_alive(pid)):
            raise UserError(self.held_message(pid if pid is not None else read_pid(fd)))
        if not same_inode(fd, self.path):  # removed or replaced after we opened it
            os.close(fd)
            return None
        if not created:
            who = f"pid {pid}" if pid is not None else "a run that recorded no pid"
            warnings.warn(f"{self.flag}: took over the stale lock {self.path} left by {who}, "
                          "which is no longer running", stacklevel=4)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def held_message(self, pid: int | None) -> str:
        who = f"pid {pid}" if pid is not None else "another process"
        return (f"{self.flag} folder {self.path.parent} is in use by a running fine-tuning run ({who}); wait "
                f"for it to end or choose another {self.flag} (if no run uses it, delete {self.path})")
