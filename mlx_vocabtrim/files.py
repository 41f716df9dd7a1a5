"""Writing outputs safely: checked before long work starts, written whole (temporary file or
directory, then rename), leftovers of killed runs cleaned by the next run, one writer at a time."""

import errno
import fcntl
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import VocabTrimError


def cache_dir() -> Path:
    """Where converted models (and other reused files) live: $MLX_VOCABTRIM_CACHE or ~/.cache/mlx_vocabtrim."""
    return Path(os.environ.get("MLX_VOCABTRIM_CACHE", Path.home() / ".cache" / "mlx_vocabtrim")).expanduser()


def read_json(path: Path, problem: str, fix: str) -> object:
    """The JSON document at `path`; unreadable or invalid JSON is a one-line error: '{path} {problem}
    (reason): {fix}'."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabTrimError(f"{path} {problem} ({e}): {fix}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _partial_prefix(path: Path) -> str:
    return f".{path.name}.partial-"


def _write_error(path: Path, error: OSError) -> VocabTrimError:
    reason = error.strerror or error
    return VocabTrimError(f"cannot write {path} ({reason}): check free space and permissions, or pick another --out")


_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def clean_stale(path: Path) -> None:
    """Remove `.NAME.partial-PID-*` leftovers beside `path` whose process is gone (a run killed
    with -9 cannot clean up after itself), and `.NAME.partial-XXXXXXXX` ones of version 0.1 (no
    process id) untouched for an hour."""
    prefix = _partial_prefix(path)
    if not path.parent.is_dir():
        return
    for entry in path.parent.glob(prefix + "*"):
        pid, *rest = entry.name[len(prefix) :].split("-", 1)
        ours = pid.isascii() and pid.isdigit() and rest  # `.NAME.partial-PID-*`
        stale = not _alive(int(pid)) if ours else time.time() - entry.lstat().st_mtime > 3600
        if stale:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def write_whole(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    The temporary file keeps `path`'s suffix (a `.gz` writer still compresses) and never
    outlives a failure; readers see the old file or the new one, never half of one.
    """
    path = Path(path)
    clean_stale(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            dir=path.parent, prefix=f"{_partial_prefix(path)}{os.getpid()}-", suffix=path.suffix
        )
    except OSError as e:
        raise _write_error(path, e) from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o644)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_whole(path: str | Path, text: str) -> None:
    write_whole(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def partial_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out` that becomes `out` when the block completes.

    An existing `out` is an error unless `force`, in which case it is replaced only once the
    new directory is complete.
    """
    out = Path(out)
    if out.exists() and not force:
        raise VocabTrimError(f"{out} already exists: pass --force to replace it, or pick another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{_partial_prefix(out)}{os.getpid()}-"))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f"{_partial_prefix(out)}{os.getpid()}-old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        if e.errno not in _NO_ROOM:
            raise
        raise _write_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def output_lock(path: str | Path, force: bool = True) -> Iterator[None]:
    """Hold `path`'s lock for the block: a second run writing the same output at the same time
    gets a one-line error instead of both "succeeding" with one result lost. The lock dies
    with its process, so a killed run never blocks the next. Without `force`, a `path` that
    another run finished since it was checked is refused once the lock is held."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # the holder removed it as we opened it
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise VocabTrimError(
            f"another run is writing {path} now: wait for it to finish, or pick another --out"
        ) from None
    if not force and path.exists():
        lock.unlink(missing_ok=True)
        os.close(fd)
        raise VocabTrimError(f"{path} already exists: pass --force to replace it, or pick another --out")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def input_file(path: str | Path, what: str, give: str) -> Path:
    """`path` checked to be a regular file before it is opened: a directory, a FIFO (which would
    block the read) or a device (/dev/zero never ends) is refused by name, with `give` as the fix."""
    path = Path(path)
    if not path.exists():
        raise VocabTrimError(f"{what} {path} does not exist: check the path")
    if path.is_dir():
        raise VocabTrimError(f"{what} {path} is a directory: give {give}")
    if not path.is_file():
        raise VocabTrimError(f"{what} {path} is not a regular file (a FIFO, device or socket): give {give}")
    return path


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b) or a.resolve() == b.resolve()
    except OSError:
        return False


def _overlap(out: Path, source: Path) -> str | None:
    """How `out` would write over the input directory `source` (inside it, or holding it), if it would."""
    if not source.is_dir():
        return None
    out, source = out.resolve(), source.resolve()
    if out.is_relative_to(source):
        return f"is inside the input directory {source}"
    if source.is_relative_to(out):
        return f"holds the input directory {source}"
    return None


def check_output(
    path: str | Path, *, inputs: Iterable[str | Path | None] = (), force: bool = False, directory: bool = False
) -> Path:
    """Check an output path before any long work: it is none of the inputs, neither inside nor
    holding an input directory, does not exist (unless `force`), is of the right kind, and its
    directory can be written to."""
    path = Path(path).expanduser()
    if not path.name or path.name in (".", ".."):
        raise VocabTrimError(f"--out {str(path)!r} names no {'directory' if directory else 'file'}: give a path")
    for source in inputs:
        if source is not None and _same(path, Path(source).expanduser()):
            raise VocabTrimError(f"--out {path} is also an input: pick another --out, inputs are never replaced")
        if source is not None and (overlap := _overlap(path, Path(source).expanduser())):
            raise VocabTrimError(f"--out {path} {overlap}: pick an --out outside it, inputs are never changed")
    kind = "directory" if directory else "file"
    if path.exists() or path.is_symlink():
        if path.is_dir() != directory:
            raise VocabTrimError(f"--out {path} is {'a directory' if path.is_dir() else 'a file'}: give a {kind} path")
        if not force:
            raise VocabTrimError(f"{path} already exists: pass --force to replace it, or pick another --out")
    parent = next(p for p in path.absolute().parents if p.exists())  # the writer creates the missing ones
    if not parent.is_dir():
        raise VocabTrimError(f"--out {path}: {parent} is not a directory; pick another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f"{_partial_prefix(path)}{os.getpid()}-probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise VocabTrimError(f"cannot write --out {path} ({e.strerror or e}): pick a writable place") from None
    return path


def command_line() -> str:
    """The running command with every option's resolved value: provenance that reruns it. Called from
    Python (no click command running), the interpreter's own command line."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return shlex.join([Path(sys.executable).name, *sys.argv])
    words = ["mlx-vocabtrim", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words += [str(v) for v in (value if isinstance(value, tuple) else [value])]
        elif getattr(param, "is_flag", False):
            words += [param.opts[0]] if value else []
        elif value is not None:
            words += [param.opts[0], str(value)]
    return shlex.join(words)
