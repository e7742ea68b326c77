"""Atomic file writes: a reader never sees a half-written file, and a crash (or a power cut) leaves the previous file
in place. Temporary names carry the writer's host and process id, so a later write can clear what a killed one left."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _new_mode(default: int) -> int:
    """``default`` less the umask: the mode a new file or directory gets."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return default & ~mask


def _mode(path: Path, default: int) -> int:
    """The mode ``path`` has (a replaced file keeps it), or a new one's."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return _new_mode(default)


def _fsync(path: Path) -> None:
    """Flush ``path``'s data (or a directory's entries) to disk: without it a rename can reach the disk before the
    data it names, and a power cut leaves an empty file where the old one was."""
    if path.is_dir():
        if not hasattr(os, "O_DIRECTORY"):
            return  # Windows cannot open a directory to flush it
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:  # before the file gets its final mode, which may not let us read it; Windows flushes writable handles only
        fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host_tag() -> str:
    """This host, and its PID namespace: containers sharing a hostname (host networking) do not share pids."""
    hostname = socket.gethostname()
    tag = re.sub(r"[^A-Za-z0-9]", "_", hostname) or "host"
    if len(tag) > 40:  # short names; the digest keeps hosts apart that share a long prefix (pods of one job)
        tag = f"{tag[:31]}_{hashlib.sha256(hostname.encode()).hexdigest()[:8]}"
    try:
        return f"{tag}_{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return tag


_HOST = _host_tag()


def _leftover_prefix(path: Path) -> str:
    """How the temporary names of this host's writers of ``path`` begin; the writer's process id follows."""
    return f".{path.name}.tmp-{_HOST}-"


def _temporary_prefix(path: Path) -> str:
    return f"{_leftover_prefix(path)}{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def _dead_writers_leftovers(path: Path) -> list[Path]:
    """The temporary files and directories that writers of ``path`` on this host left when they were killed (their
    process is gone). Others' are not listed: they may still be writing."""
    if os.name != "posix" or not path.parent.is_dir():
        return []  # os.kill(pid, 0) would terminate the process on Windows
    pattern = re.compile(re.escape(_leftover_prefix(path)) + r"(\d+)-")
    return [entry for entry in path.parent.iterdir()
            if (match := pattern.match(entry.name)) is not None and not _alive(int(match.group(1)))]


def _remove_leftovers(path: Path) -> None:
    for entry in _dead_writers_leftovers(path):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def resolved_parent(path: str | os.PathLike) -> Path:
    """``path`` with its folder resolved (symlinks, ".."), its own name kept: "missing/../x" (which does not exist
    until something makes "missing") is x, and a link at ``path`` stays the link."""
    path = Path(path)
    return path.resolve() if path.name in ("", ".", "..") else path.parent.resolve() / path.name


def check_writable(path: str | os.PathLike) -> None:
    """Make the folder of ``path`` (a file or directory to write later) and check a file can be created there, so an
    unwritable output fails before the work, under the name the user gave: an existing read-only folder passes
    ``mkdir(exist_ok=True)``."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".msfp-write-check-")
    except OSError as e:
        raise type(e)(f"cannot write {path} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed. A symlink at
    ``path`` keeps pointing to the replaced file."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path))
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.chmod(tmp, _mode(path, 0o666))  # mkstemp creates 0600
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finish_tree(directory: Path) -> None:
    """Give the files written into ``directory`` a new file's mode (safetensors writes 0600 whatever the umask) and
    flush them to disk."""
    mode = _new_mode(0o666)
    for root, dirs, files in os.walk(directory):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(Path(root, name))
                os.chmod(Path(root, name), mode)


def _fsync_directories(directory: Path) -> None:
    for root, _, _ in os.walk(directory):
        _fsync(Path(root))


def _moved_aside(path: Path) -> Path:
    """Where :func:`atomic_directory` moves the earlier version of ``path`` during its swap."""
    return path.with_name(f".{path.name}.old")


def interrupted_save(path: str | os.PathLike) -> Path | None:
    """The earlier version of ``path`` that :func:`atomic_directory` moved aside, when a crash between its two renames
    left only that: ``path`` missing, and the new version still in a temporary directory of a writer that is gone.
    (A crash after the swap leaves ``.old`` too; if ``path`` was deleted since, that ``.old`` is no save to resume.)
    Else None."""
    unfinished = unfinished_save(path)
    return unfinished[0] if unfinished is not None and _writer_gone(Path(path)) else None


def _writer_gone(path: Path) -> bool:
    """Whether a new version of ``path`` lies in a temporary directory of a writer this process can tell is gone."""
    return any(entry.is_dir() for entry in _dead_writers_leftovers(path))


def unfinished_save(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(earlier, new)`` when ``path`` is missing, its earlier version sits where :func:`atomic_directory` moves it
    aside, and a writer's new version beside it: a save between its two renames, killed or (on another host, in
    another PID namespace) perhaps still running. Else None. :func:`interrupted_save` is the case this process can
    tell the writer is gone, and the next save puts ``earlier`` back."""
    path = Path(path)
    old = _moved_aside(path)
    if path.exists() or path.is_symlink() or not old.is_dir() or old.is_symlink():
        return None
    new = next((e for e in path.parent.iterdir() if e.name.startswith(f".{path.name}.tmp-") and e.is_dir()), None)
    return None if new is None else (old, new)


def _refuse_unfinished_save(path: Path) -> None:
    """Raise on an :func:`unfinished_save` that :func:`interrupted_save` cannot put back: saving anyway would make
    ``path`` without the earlier version's other files, and the save after it would delete ``.old``."""
    unfinished = unfinished_save(path)
    if unfinished is not None and not _writer_gone(path):
        old, new = unfinished
        raise FileExistsError(f"{old} holds the earlier version of {path}, moved aside by a save that has not "
                              f"finished ({new} holds its new version, written by a process this one cannot tell is "
                              f"gone); if no save of {path} is running, rename {old} back to {path} and save again")


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)  # no data is copied, and the original stays in place until the swap
    except OSError:
        shutil.copy2(src, dst)


def link_entry(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put ``src`` (a file, a directory tree or a symlink) at ``dst`` too, as hard links where the filesystem allows
    (no data copied); ``src`` stays as it was, so a failure before the caller's next step loses nothing."""
    src, dst = Path(src), Path(dst)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _carry_over(directory: Path, tmp: Path, written: set[str]) -> None:
    """Put every entry of ``directory`` that the new version does not write into ``tmp`` as well."""
    for entry in directory.iterdir():
        if entry.name not in written:
            link_entry(entry, tmp / entry.name)


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise if :func:`atomic_directory` could not replace ``path``: the current directory is inside it, or a save of
    it that this process cannot finish is in the way (:func:`unfinished_save`). Commands call it before their work,
    not only when they save."""
    path = Path(path)
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise ValueError(f"refusing to replace {path}: the current directory is inside it (run from elsewhere)")
    _refuse_unfinished_save(path)


@contextmanager
def atomic_directory(path: str | os.PathLike, carry_over: bool = True):
    """Yield an empty temporary directory beside ``path`` to write a new version of its files into; on success it
    replaces ``path`` as a whole, so a reader sees all old files or all new ones, never a mix.

    Entries of an existing ``path`` that the new version does not write (a user's notes, sample files) are carried
    over unless ``carry_over`` is False; on error ``path`` is left as it was. A symlink at ``path`` keeps pointing to
    the replaced directory.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier = interrupted_save(path)
    if earlier is not None:  # put it back first: it is the last complete version, with the user's own files
        os.replace(earlier, path)
    _remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temporary_prefix(path)))
    try:
        yield tmp
        os.chmod(tmp, _mode(path, 0o777))  # mkdtemp creates 0700
        _finish_tree(tmp)  # before carrying over: carried-over files are the old version's, already on disk
        replacing = path.exists()
        if replacing and carry_over:
            _carry_over(path, tmp, {p.name for p in tmp.iterdir()})
        _fsync_directories(tmp)  # the new directory entries, carried-over ones included
        if not replacing:
            os.replace(tmp, path)
            _fsync(path.parent)
            return
        old = _moved_aside(path)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)  # left by a crash after the swap below, before its removal
        else:
            old.unlink(missing_ok=True)
        try:  # both renames: a Ctrl-C right after the first one returns must not leave only ".old"
            os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            if not path.exists() and old.is_dir():  # between the renames: put the earlier version back
                os.replace(old, path)
            raise
        _fsync(path.parent)
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


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its ancestors that do not exist yet, innermost first."""
    missing = []
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) while they are empty: a run refused before writing anything leaves no
    trace of a mistyped output path."""
    for folder in folders:
        try:
            folder.rmdir()  # only ever an empty one
        except FileNotFoundError:
            continue
        except OSError:
            return  # it holds something: so do the folders around it


@contextmanager
def exclusive_run(path: str | os.PathLike, command: str):
    """Hold ``path``'s lock (the file ``.NAME.lock`` beside it) for the block; raise at once if another run holds it.
    Two runs writing one output would mix their files (one deleting the other's work). An advisory lock, which the OS
    releases when its process dies; without ``fcntl`` (Windows) runs are not guarded. Folders made for the lock are
    removed afterwards if the run left them empty."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    made = _missing_folders(lock.parent)
    while True:
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(lock, "a+", encoding="utf-8")
        except FileNotFoundError:
            if lock.parent.is_dir():
                raise
            continue  # a run that had made the folder removed it, empty, between our mkdir and our open
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise FileExistsError(f"{path} is being written by another run ({holder}); wait for it to finish or "
                                  "choose another output") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        f.close()  # its holder removed it between our open and our lock: lock the file that is there now
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{command}, pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)  # before unlocking: whoever locks the removed file next sees it is gone
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
        _remove_empty(made)
