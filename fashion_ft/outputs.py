"""Guards for a run's files, checked before any work and creating nothing: where the best model, last.pt,
metrics.json and the lock go, that they never replace an input or earlier results, that the folders can be
written, and which TensorBoard run folder is this run's; and the lock that keeps two live runs out of one
output folder.

Exit codes follow one rule. UsageError (exit 2): the command line is what is wrong, and changing it is the
fix: a malformed path (a trailing '/', a --run-name that leaves --logdir or holds a control character), the
wrong kind of thing (anything but a regular file where the run writes one, a file where a folder goes), a
symlink loop (always reported by resolve_path), a collision with another output or an input, earlier
results without --overwrite.
UserError (exit 1): the command line is fine but the file system cannot take the run now: no permission, a
read-only or pseudo file system (/proc, /sys), too little free space, or an output folder a live run holds.
"""

import errno
import fcntl
import itertools
import os
import re
import shutil
import stat
import tempfile
import unicodedata
import warnings
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError, UserError

NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # what flock raises where a file system has none
LOGDIR_MIN_FREE_BYTES = 1 << 20  # TensorBoard's event files of one run are far smaller than this
ROLES = {"best": "the best model", "last": "last.pt", "metrics": "metrics.json", "lock": "the lock file",
         "plain": "the best model as a plain state_dict"}
# What would split a one-line message or the printed `tensorboard:` line: control characters (newline,
# ESC, NUL), line and paragraph separators, and the surrogate escapes of bytes that are not UTF-8.
UNPRINTABLE_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")
KINDS = {stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symlink", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket"}


@dataclass(frozen=True)
class RunFiles:
    """The files one run writes: the best model at --output, the others beside it."""

    best: Path
    last: Path
    metrics: Path
    lock: Path
    plain: Path | None  # the best weights as a plain state_dict, when the input was one (a user's own file)

    @classmethod
    def for_output(cls, output: str, *, plain: bool = True) -> "RunFiles":
        """`plain`: whether this run writes the plain state_dict; if not, that path is none of its business."""
        if os.path.basename(output) in ("", ".", ".."):  # also an empty --output or one ending in a separator
            raise UsageError(f"--output {output!r} names a folder; give the best model's file name, "
                             f"e.g. --output {os.path.join(output, 'model.pt')}")
        best = Path(output)
        if best.is_dir():
            raise UsageError(f"--output {output} is an existing folder; give the best model's file name, "
                             f"e.g. --output {best / 'model.pt'}")
        folder = best.parent
        return cls(best, folder / "last.pt", folder / "metrics.json", folder / ".lock",
                   folder / f"{best.stem}.state_dict.pt" if plain else None)

    def roles(self) -> dict[str, Path]:
        """The files this run writes, by role."""
        return {role: getattr(self, role) for role in ROLES if getattr(self, role) is not None}

    def results(self) -> list[Path]:
        """What the run saves, all but the lock: what --overwrite clears, what atomic_write writes."""
        return [path for role, path in self.roles().items() if role != "lock"]

    def names(self) -> tuple[str, ...]:
        """The file names written through atomic_write, whose temporaries a killed run leaves."""
        return tuple(path.name for path in self.results())


# ---------------------------------------------------------------- paths

def resolve_path(path: Path, flag: str) -> Path:
    """The absolute path with every symlink followed. A symlink loop, which realpath leaves in the path, is a
    UsageError naming `flag`, as is a name too long; a path not there yet is fine."""
    try:
        resolved = Path(os.path.realpath(path))
    except OSError as exc:  # the working folder has gone
        raise UsageError(f"{flag} {path}: {exc.strerror}") from None
    try:
        os.stat(resolved)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{flag} {path}: symlink loop; point {flag} at a real path") from None
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


def check_writable_folder(folder: Path, flag: str) -> None:
    """`folder` exists or can be created, by us: one probe, a nameless temporary file in its nearest
    existing ancestor, which leaves nothing behind."""
    resolve_path(folder, flag)  # a loop would otherwise read as "is a file", its link being the ancestor
    ancestor = existing_ancestor(folder)
    if not ancestor.is_dir():
        raise UsageError(f"{flag}: cannot create the folder {folder}: {ancestor} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as exc:  # /proc and /sys answer ENOENT or EACCES, which would mislead
        pseudo = shutil.disk_usage(ancestor).total == 0
        cause = "a pseudo file system (like /proc or /sys) that cannot hold files" if pseudo else exc.strerror
        raise UserError(f"{flag}: cannot write in {ancestor}: {cause}; choose another folder") from None


def check_disk_space(folder: Path, needed_bytes: int, flag: str = "--output") -> None:
    """At least `needed_bytes` free where `folder` is or will be created (checked after the probe)."""
    free = shutil.disk_usage(existing_ancestor(folder)).free
    if free < needed_bytes:
        raise UserError(f"{flag}: only {free / 2**20:.1f} MiB free in {folder}; the run needs about "
                        f"{needed_bytes / 2**20:.0f} MiB")


# ---------------------------------------------------------------- the run's files

def check_run_files(files: RunFiles, *, inputs: dict[str, Path | None], resume: Path | None,
                    overwrite: bool) -> None:
    """Refuse, before any work and creating nothing, anything but a regular file where the run writes
    one, outputs that collide with each other or with an input (never allowed, not even with --overwrite),
    existing results without --overwrite (except a resumed run continuing in its own folder: `resume` is
    then exactly `files.last`), and an output folder that cannot be written. `inputs` maps each flag to
    the file the run reads, None if unused."""
    outputs = {role: resolve_path(path, "--output") for role, path in files.roles().items()}  # a loop as a loop
    for role, path in files.roles().items():
        check_regular_or_absent(path, role)
    check_outputs_apart(files, outputs)
    continuing = resumes_in_place(files, resume)
    check_inputs_kept(files, outputs, inputs, continuing)
    for path in files.results():
        if not overwrite and not continuing and os.path.lexists(path):
            elsewhere = "" if resume is None else (f" and is not part of the resumed run (--resume {resume} "
                                                   "continues in place only with an --output beside it)")
            raise UsageError(f"--output: {path} already exists{elsewhere}; pass --overwrite to replace it or "
                             "choose another --output")
    check_writable_folder(files.best.parent, "--output")


def check_regular_or_absent(path: Path, role: str) -> None:
    """Replacing a device, a pipe, a socket, a symlink or a folder is never what a run is for, so only a
    regular file may stand where it writes; lstat, since a link is never followed."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # absent, or below a file, which check_writable_folder reports
        return
    if not stat.S_ISREG(mode):
        raise UsageError(f"--output: {path} is {KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, but the run "
                         f"writes {ROLES[role]} there and replaces nothing but a regular file, not even with "
                         "--overwrite; choose another --output")


def resumes_in_place(files: RunFiles, resume: Path | None) -> bool:
    """--resume names this run's own last.pt: the run continues its own files."""
    if resume is None:
        return False
    return same_file(resolve_path(Path(resume), "--resume"), resolve_path(files.last, "--output"))


def check_outputs_apart(files: RunFiles, outputs: dict[str, Path]) -> None:
    for role, target in outputs.items():
        if role != "best" and same_file(outputs["best"], target):
            raise UsageError(f"--output {files.best} is where the run keeps {ROLES[role]}; give the best model "
                             f"another name, e.g. --output {files.best.parent / 'model.pt'}")


def check_inputs_kept(files: RunFiles, outputs: dict[str, Path], inputs: dict[str, Path | None],
                      continuing: bool) -> None:
    """No input is ever written to, but the last.pt that a resumed run (`continuing`) goes on with."""
    for flag, path in inputs.items():
        if path is None:
            continue
        source = resolve_path(path, flag)
        for role, target in outputs.items():
            if same_file(source, target) and not (continuing and flag == "--resume" and role == "last"):
                where = "" if role == "best" else f": the run writes {ROLES[role]} to {files.roles()[role]}, which"
                raise UsageError(f"--output {files.best}{where} is the {flag} input; an input is never replaced, "
                                 "not even with --overwrite: choose another --output")


# ---------------------------------------------------------------- TensorBoard folder

def check_run_name(run_name: str) -> None:
    """One plain folder name: nothing that would put the run outside --logdir or break a printed line."""
    if not run_name:
        raise UsageError(f"--run-name {run_name!r}: give a plain folder name")
    if any(unicodedata.category(c) in UNPRINTABLE_CATEGORIES for c in run_name):
        raise UsageError(f"--run-name {run_name!r} has a control character or a line break; "
                         "give a plain folder name")
    if os.path.isabs(run_name) or run_name in (".", "..") or any(s and s in run_name for s in (os.sep, os.altsep)):
        raise UsageError(f"--run-name {run_name!r} would leave --logdir; give a plain folder name "
                         "(no '/', no '..', not absolute)")


def check_logdir(logdir: str, run_name: str | None, *, resume: bool = False) -> Path:
    """Check --logdir and --run-name before any work, creating nothing; returns the run's folder (see
    run_folder: another run's folder is never shared). `run_name` None: only --logdir is checked, and
    returned (a generated default name is always a plain name)."""
    if not logdir:
        raise UsageError("--logdir is empty; give a folder")
    if run_name is not None:
        check_run_name(run_name)
    root = resolve_path(Path(logdir), "--logdir")
    if root.exists() and not root.is_dir():
        raise UsageError(f"--logdir {logdir} is a file; TensorBoard needs a folder")
    run = Path(logdir) if run_name is None else run_folder(Path(logdir), root, run_name, resume)
    check_writable_folder(run, "--logdir")
    check_disk_space(run, LOGDIR_MIN_FREE_BYTES, "--logdir")
    return run


def run_folder(logdir: Path, root: Path, run_name: str, resume: bool) -> Path:
    """logdir/run_name; when another run's files are there, the first free logdir/run_name_N (as
    Lightning's version_N), since two runs in one folder make one TensorBoard run of interleaved steps.
    A resumed run (`resume`) goes on in its own folder. `root`: logdir resolved."""
    named = logdir / run_name
    if resolve_path(named, "--run-name").exists() and not named.is_dir():
        raise UsageError(f"--run-name {run_name}: {named} is a file; TensorBoard needs a folder")
    for n in itertools.count():  # ends: finitely many names exist (see taken)
        run = logdir / f"{run_name}_{n}" if n else named
        resolved = resolve_path(run, "--run-name")
        if root not in resolved.parents:  # a planted symlink must not send the logs out of --logdir
            raise UsageError(f"--run-name {run.name}: {run} links to {resolved}, outside --logdir {logdir}; "
                             "remove the link or choose another --run-name")
        if resume or not taken(run):
            return run


def taken(folder: Path) -> bool:
    """Anything there but an empty folder: another run's events, a file, a link to nowhere. Only what
    exists is taken, so that run_folder's search ends."""
    if not os.path.lexists(folder):
        return False
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:  # a file, a link to nothing, a folder we may not list
        return True


# ---------------------------------------------------------------- the lock

def make_folders(folder: Path) -> list[Path]:
    """mkdir -p that returns, top-down, the folders it made itself (not those another process made)."""
    folder = Path(folder).absolute()
    created = []
    for path in reversed([p for p in (folder, *folder.parents) if not os.path.lexists(p)]):
        with suppress(FileExistsError):
            os.mkdir(path)
            created.append(path)
    return created


def remove_stale_temporaries(folder: Path, names: tuple[str, ...]) -> None:
    """checkpoint.atomic_write's .<name>.XXXXXXXX.tmp files that a run killed mid-save left (up to the size
    of last.pt each); called with the lock held, so no live run of ours writes them. Never fails: a file we
    cannot remove costs space, not the run."""
    ours = [re.compile(rf"\.{re.escape(name)}\..+\.tmp", re.DOTALL) for name in names]
    with suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if any(p.fullmatch(entry.name) for p in ours) and entry.is_file(follow_symlinks=False):
                with suppress(OSError):
                    os.unlink(entry.path)


class RunLock:
    """`with RunLock(files.lock, clean=files.names()): ...` holds an output folder for one live run.

    The holder keeps an exclusive flock on the lock file, which the kernel drops however the process dies,
    so a killed run's lock is simply taken again; the file holds the holder's pid, for the message that
    refuses a second run. Without flock, creating the file (O_EXCL) is the lock, with a warning: a killed
    run's file must then be deleted by hand. Taking the lock is the run's first write: it creates the output
    folder, and the folders it created go again at exit while empty (a run that failed before its first save
    leaves nothing). Once held, it removes what a killed run left of the files named in `clean`. Under
    torchrun only rank 0 takes it."""

    def __init__(self, path: Path, flag: str = "--output", clean: Iterable[str] = ()):
        self.path, self.flag, self.clean = Path(path), flag, tuple(clean)
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> "RunLock":
        resolve_path(self.path, self.flag)  # a symlink loop is reported as everywhere else
        try:
            for _ in range(5):  # an ending run may remove the file, or its empty folder, between our steps
                self._created += make_folders(self.path.parent)
                self._fd = self._take()
                if self._fd is not None:
                    remove_stale_temporaries(self.path.parent, self.clean)
                    return self
            raise UserError(f"{self.flag}: cannot take the lock {self.path}: other runs keep replacing it")
        except BaseException as exc:
            self.__exit__()
            if isinstance(exc, OSError):
                cause = "it is a symlink, which the lock never follows; delete it" if exc.errno == errno.ELOOP \
                    else exc.strerror or exc
                raise UserError(f"{self.flag}: cannot take the lock {self.path}: {cause}") from None
            raise

    def _take(self) -> int | None:
        """Our descriptor holding the lock; None to try again; a UserError while another run holds it."""
        try:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                fd, created = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW), False  # never write through a link
        except FileNotFoundError:  # its holder just removed it, or an ending run the empty folder it had made
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(fd)
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                os.close(fd)
                if created:
                    with suppress(OSError):  # the flock error is the one to report
                        os.unlink(self.path)
                raise
            if not created:  # without flock, an existing file is a run's lock, live or killed
                self._refuse(fd)
            warnings.warn(f"{self.flag}: {self.path.parent} has no flock; should this run be killed, "
                          f"delete {self.path} before the next one", stacklevel=3)
        if not same_inode(fd, self.path):  # its holder removed it after we opened it
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def __exit__(self, *_exc) -> bool:
        if self._fd is not None:
            with suppress(OSError):  # the folder may have gone: nothing left to release but the descriptor
                if same_inode(self._fd, self.path):
                    os.unlink(self.path)
            os.close(self._fd)
            self._fd = None
        for folder in reversed(self._created):  # while empty: one that holds anything keeps itself and its parents
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._created = []
        return False

    def _refuse(self, fd: int) -> None:
        """Another run holds the folder: the UserError, naming its pid where the file gives one."""
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f"pid {pid}" if pid.isdigit() else "another process"
        raise UserError(f"{self.flag} folder {self.path.parent} is in use by a running fine-tuning run ({who}); "
                        f"wait for it to end or choose another {self.flag} (if no run uses it, delete {self.path})")


def same_inode(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
