"""Atomic file writes: a reader never sees a half-written file, and a crash leaves the previous file in place."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _mode(path: Path, default: int) -> int:
    """The mode ``path`` has (a replaced file keeps it), or ``default`` less the umask for a new one."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
        os.umask(mask)
        return default & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _mode(path, 0o666))  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)  # no data is copied, and the original stays in place until the swap
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(directory: Path, tmp: Path, written: set[str]) -> None:
    """Put every entry of ``directory`` that the new version does not write into ``tmp`` as well."""
    for entry in directory.iterdir():
        if entry.name in written:
            continue
        target = tmp / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


@contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield an empty temporary directory beside ``path`` to write a new version of its files into; on success it
    replaces ``path`` as a whole, so a reader sees all old files or all new ones, never a mix.

    Entries of an existing ``path`` that the new version does not write (a user's notes, sample files) are carried
    over; on error ``path`` is left as it was. A symlink at ``path`` keeps pointing to the replaced directory.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise ValueError(f"refusing to replace {path}: the current directory is inside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        yield tmp
        os.chmod(tmp, _mode(path, 0o777))  # mkdtemp creates 0700
        if not path.exists():
            os.replace(tmp, path)
            return
        _carry_over(path, tmp, {p.name for p in tmp.iterdir()})
        old = path.with_name(f".{path.name}.old")
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)  # left by a crash between the two renames below
        else:
            old.unlink(missing_ok=True)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # put the earlier version back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)  # the new version is in place: a leftover only costs disk space


def _finite_or_none(obj):
    # Strict JSON has no inf/nan (e.g. the PSNR of identical images): write null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented strict JSON (non-finite floats become null), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite_or_none(obj), indent=2, allow_nan=False) + "\n")
