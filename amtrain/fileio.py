"""Files written whole or not at all, and file identities: the one home of both.

Every file amtrain writes goes through `atomic_target` (or the `write_*_atomic` helpers on
top of it): the content goes to a temporary name beside the target (`.NAME.tmpPID`), is
fsynced, and is renamed into place (`os.replace`, atomic on POSIX). A crash leaves either the
old file or the new one, never a torn one under the final name; on an error the temporary
file is removed. The file gets the mode a plain `open()` gives (0666 less the umask: 0644
under umask 022), whatever the writer used (safetensors writes 0600). (audiocraft's `flashy.utils.write_and_rename` does the same.)

Operating-system errors that stop a write (disk full, quota, read-only file system, no
permission) become one `UserError` line naming the path, the cause and the fix, raised from one
place: `write_errors`, which `atomic_target` and `make_dirs` use (so does anything else that
writes, e.g. a checkpoint save). Finished files are kept; the temporary one is removed.

`file_sha256` names a file by content; `short_hash` makes the short, stable ids prep uses for
its resumable units (a hash of the source's path, size and mtime, plus the settings).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from amtrain.errors import UserError

# errno -> (cause, fix) for the errors that stop a write whatever is written
_WRITE_FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free space there (or write elsewhere) and rerun; finished work is kept"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota and rerun; finished work is kept"),
    errno.EFBIG: ("file too large for the file system or the file-size limit (ulimit -f)", "raise the limit or write elsewhere"),
    errno.EROFS: ("read-only file system", "write to a folder on a writable file system"),
    errno.EACCES: ("permission denied", "write to a folder you may write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "write to a folder you may write to, or fix its permissions"),
}


@contextlib.contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError that stops writing `path` (see _WRITE_FAULTS) into one UserError line:
    `PATH: cannot write (CAUSE); FIX`. Other OSErrors pass through unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_FAULTS:
            raise
        cause, fix = _WRITE_FAULTS[e.errno]
        raise UserError(f"{path}: cannot write ({cause}); {fix}") from e


def make_dirs(path: str | Path) -> Path:
    """mkdir -p, with write_errors' one-line errors."""
    path = Path(path)
    with write_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_target(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; on a clean exit it is fsynced and
    renamed to `path`, on an error removed. `fsync=False` for caches whose torn entry is
    detected and rebuilt anyway (the rename still makes it all-or-nothing for a reader).
    A full disk or a read-only folder raises write_errors' one-line UserError."""
    path = Path(path)
    tmp = atomic_path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~umask())  # what open() gives; writers that make 0600 files (safetensors) too
            if fsync:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def is_temp_name(name: str) -> bool:
    """Whether `name` is an `atomic_path` temporary (`.NAME.tmpPID`)."""
    head, sep, pid = name.rpartition(".tmp")
    return name.startswith(".") and bool(sep) and len(head) > 1 and pid.isdigit()


def umask() -> int:
    """The process's umask, read without changing it (Linux /proc; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_bytes_atomic(path: str | Path, data: bytes, fsync: bool = True) -> None:
    with atomic_target(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent))


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def short_hash(key: str | bytes, length: int = 10) -> str:
    """A short stable id of `key` (hex of SHA-1): prep's unit ids and cache names."""
    data = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    return hashlib.sha1(data).hexdigest()[:length]


def source_id(path: Path, salt: str = "", length: int = 10) -> str:
    """The id of one input file as prep's resumable unit: a hash of its resolved path, size,
    modification time and the settings (`salt`), so an edited file or a changed setting makes
    a new unit and an unchanged one is found again."""
    st = path.stat()
    return short_hash(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{salt}", length)
