"""Operating-system faults for the prep tests, without root tricks: a disk that fills up after
a byte budget (ENOSPC) and a read-only folder (EROFS), confined to one folder.

Both patch the way Python opens files (`io.open`, which `open` and `Path.open` /
`Path.write_bytes` call), so every file amtrain writes under the folder meets the fault where a
real kernel would raise it: the write (ENOSPC) or the open (EROFS); the read-only folder also
refuses `os.open` and `os.mkdir`. (The dataset lock's few bytes go through `os.pwrite`, which the
full disk does not meter.) Tests run as root here, so `chmod 0555` would not stop a write;
tests/test_prep_faults.py also checks the same paths on a real tmpfs where mounting is allowed.

As a program it runs the amtrain CLI with a fault installed (for one-line-error checks):
    python -m tests.fault_helpers enospc BUDGET FOLDER -- prep-text ...
    python -m tests.fault_helpers erofs 0 FOLDER -- prep-text ...
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import sys
from pathlib import Path

_REAL_OPEN = io.open
_REAL_OS_OPEN = os.open
_REAL_MKDIR = os.mkdir


def _writing(mode: str) -> bool:
    return any(c in mode for c in "wax+")


def _under(path, folder: Path) -> bool:
    if isinstance(path, int):
        return False
    return Path(os.path.abspath(path)).is_relative_to(folder)


class _Metered:
    """A file whose writes draw on the disk's budget; anything else goes to the real file."""

    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        n = memoryview(data).nbytes if not isinstance(data, str) else len(data.encode())
        if self._disk.used + n > self._disk.budget:
            self._disk.faults += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.used += n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FullDisk:
    """Writes under `folder` fail with ENOSPC once `budget` bytes have been written (`used`
    counts them: run once with budget=inf to measure a whole prep)."""

    def __init__(self, folder: str | Path, budget: float = float("inf")):
        self.folder, self.budget, self.used, self.faults = Path(folder).absolute(), budget, 0, 0

    def open(self, file, mode="r", *args, **kwargs):
        f = _REAL_OPEN(file, mode, *args, **kwargs)
        return _Metered(f, self) if _writing(mode) and _under(file, self.folder) else f


class ReadOnly:
    """Opening a file for writing (io.open or os.open), or making a folder, under `folder` fails
    with EROFS."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).absolute()

    def open(self, file, mode="r", *args, **kwargs):
        if _writing(mode) and _under(file, self.folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return _REAL_OPEN(file, mode, *args, **kwargs)

    def os_open(self, path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, self.folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return _REAL_OS_OPEN(path, flags, *args, **kwargs)

    def mkdir(self, path, mode=0o777, *args, **kwargs):
        if _under(path, self.folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return _REAL_MKDIR(path, mode, *args, **kwargs)


@contextlib.contextmanager
def installed(fault):
    """Patch io.open / builtins.open (and os.open, os.mkdir for ReadOnly) for the `with` block."""
    saved = io.open, builtins.open, os.open, os.mkdir
    io.open = builtins.open = fault.open
    if isinstance(fault, ReadOnly):
        os.open, os.mkdir = fault.os_open, fault.mkdir
    try:
        yield fault
    finally:
        io.open, builtins.open, os.open, os.mkdir = saved


def temp_files(folder: Path) -> list[Path]:
    """atomic_target's temporaries (`.NAME.tmpPID`) left anywhere under `folder`."""
    from amtrain.fileio import is_temp_name

    return [p for p in folder.rglob("*") if is_temp_name(p.name)]


if __name__ == "__main__":
    kind, budget, folder, sep, *cli = sys.argv[1:]
    assert sep == "--"
    fault = FullDisk(folder, int(budget)) if kind == "enospc" else ReadOnly(folder)
    from amtrain.cli import main

    sys.argv = ["amtrain", *cli]
    with installed(fault):
        main()


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str):
    """A real tmpfs of `size` (e.g. "1m") mounted on `folder` (made here) and unmounted after;
    pytest.skip where mounting is not allowed."""
    import subprocess

    import pytest

    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)
