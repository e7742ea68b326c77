import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from msfp import fileio
from msfp.fileio import atomic_directory


def tree(path):
    """{relative path: content} of every file below ``path``, and link targets as 'link -> target'."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, path)
            if os.path.islink(p):
                out[rel] = f"link -> {os.readlink(p)}"
            elif os.path.isfile(p):
                out[rel] = open(p).read()
    return out


def write(directory, **files):
    for name, text in files.items():
        (directory / name).write_text(text)


@pytest.fixture
def existing(tmp_path):
    """A directory with the two files a save writes and a user's own entries beside them."""
    d = tmp_path / "model"
    (d / "evals").mkdir(parents=True)
    write(d, weights="old weights", config="old config", notes="my notes")
    (d / "evals" / "run1.json").write_text("{}")
    os.symlink("notes", d / "notes-link")
    return d


def test_new_files_replace_old_ones_and_other_entries_are_kept(tmp_path, existing):
    os.chmod(existing, 0o750)  # not what a new directory gets under any usual umask
    with atomic_directory(existing) as tmp:
        assert tmp.parent == tmp_path and list(tmp.iterdir()) == []
        write(tmp, weights="new weights", config="new config")
    assert tree(existing) == {"weights": "new weights", "config": "new config", "notes": "my notes",
                     "evals/run1.json": "{}", "notes-link": "link -> notes"}
    assert os.stat(existing).st_mode & 0o777 == 0o750  # the mode it had
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old directory left behind


def test_without_carry_over_the_new_version_is_all_there_is(tmp_path, existing):
    # e.g. retrained weights: an evaluation or model card of the earlier ones must not stay beside them.
    with atomic_directory(existing, carry_over=False) as tmp:
        write(tmp, weights="new weights")
    assert tree(existing) == {"weights": "new weights"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_new_directory_is_created(tmp_path):
    with atomic_directory(tmp_path / "sub" / "new") as tmp:
        write(tmp, weights="w")
    assert tree(tmp_path / "sub" / "new") == {"weights": "w"}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["new"]


def test_an_error_while_writing_leaves_the_earlier_version(tmp_path, existing):
    before = tree(existing)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(existing) as tmp:
            write(tmp, weights="half")
            raise OSError("disk full")
    assert tree(existing) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_swap_puts_the_earlier_version_back(tmp_path, existing, monkeypatch):
    before = tree(existing)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(existing) and ".tmp" in str(src):
            raise OSError("simulated failure of the second rename")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError, match="second rename"):
        with atomic_directory(existing) as tmp:
            write(tmp, weights="new weights")
    assert tree(existing) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_interrupt_right_after_the_first_rename_puts_the_earlier_version_back(tmp_path, existing, monkeypatch):
    # The Ctrl-C landed outside the block that undid a failed second rename: the new version was deleted, and only
    # ".model.old" was left, which no later save or hint pointed to.
    before = tree(existing)
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst).name == ".model.old":
            raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(existing) as tmp:
            write(tmp, weights="new weights")
    assert tree(existing) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

def test_a_symlinked_directory_stays_a_link(tmp_path, existing):
    link = tmp_path / "link"
    os.symlink(existing, link)
    for text in ("first", "second"):  # the second save used to fail on the first one's leftovers
        with atomic_directory(link) as tmp:
            write(tmp, weights=text)
        assert link.is_symlink() and tree(existing)["weights"] == text and tree(link)["notes"] == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "model"]


def test_leftovers_of_a_crash_between_the_renames_are_cleared(tmp_path, existing):
    (tmp_path / ".model.old").mkdir()
    write(tmp_path / ".model.old", weights="stale")
    with atomic_directory(existing) as tmp:
        write(tmp, weights="new weights")
    assert tree(existing)["weights"] == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def dead_writers_directory(path):
    """The complete new version a writer killed between the two renames leaves in its temporary directory."""
    import subprocess

    writer = subprocess.Popen(["true"])
    writer.wait()  # its pid is free now: a process that is gone
    leftover = path.with_name(f"{fileio._leftover_prefix(path)}{writer.pid}-x")
    leftover.mkdir()
    return leftover


def test_a_crash_between_the_renames_is_undone_by_the_next_write(tmp_path, existing):
    # Killed after moving the earlier version aside and before moving the new one in: ".model.old" and the new
    # version's temporary directory are left.
    os.replace(existing, tmp_path / ".model.old")
    dead_writers_directory(existing)
    assert fileio.interrupted_save(existing) == tmp_path / ".model.old"
    for text in ("first", "second"):  # the second write used to delete ".model.old", the user's files with it
        with atomic_directory(existing) as tmp:
            write(tmp, weights=text)
    assert tree(existing) == {"weights": "second", "config": "old config", "notes": "my notes",
                              "evals/run1.json": "{}", "notes-link": "link -> notes"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and fileio.interrupted_save(existing) is None


def test_a_swap_another_host_left_unfinished_is_refused_not_overwritten(tmp_path, existing):
    # Killed between the renames on another host (or in another PID namespace, or its pid now reused): this
    # process cannot tell the writer is gone. Saving used to make "model" afresh without the user's files, and the
    # save after it deleted ".model.old", the only copy of them.
    os.replace(existing, tmp_path / ".model.old")
    (tmp_path / ".model.tmp-otherhost_4026531836-77-x").mkdir()
    for _ in range(2):
        with pytest.raises(FileExistsError, match=rf"{tmp_path / '.model.old'} holds the earlier version of "
                                                  rf"{existing}, .* rename {tmp_path / '.model.old'} back to "):
            with atomic_directory(existing) as tmp:
                write(tmp, weights="new")
    assert tree(tmp_path / ".model.old")["notes"] == "my notes" and not existing.exists()
    os.replace(tmp_path / ".model.old", existing)  # what the message says to do
    with atomic_directory(existing) as tmp:
        write(tmp, weights="new")
    assert tree(existing)["notes"] == "my notes" and tree(existing)["weights"] == "new"


def test_hosts_that_share_a_long_name_prefix_get_their_own_tags(monkeypatch):
    # Names were cut to 40 characters: two pods of one job got one tag, and each took the other's live files for
    # a dead writer's.
    tags = set()
    for name in ("msfp-calibration-sweep-2026-12-06-worker-node-a", "msfp-calibration-sweep-2026-12-06-worker-node-b"):
        monkeypatch.setattr(fileio.socket, "gethostname", lambda name=name: name)
        tags.add(fileio._host_tag())
    assert len(tags) == 2 and all(tag.startswith("msfp_calibration_sweep_2026_12_") for tag in tags)


def test_an_old_version_left_after_a_swap_is_not_revived(tmp_path, existing):
    # Killed after the swap, before removing ".model.old"; then the user deleted the directory on purpose.
    shutil.copytree(existing, tmp_path / ".model.old")
    (tmp_path / ".model.old" / "eval_of_old_weights.json").write_text("{}")
    shutil.rmtree(existing)
    assert fileio.interrupted_save(existing) is None
    with atomic_directory(existing) as tmp:
        write(tmp, weights="new weights")
    assert tree(existing) == {"weights": "new weights"}


def test_a_symlinked_file_stays_a_link(tmp_path):
    from msfp.fileio import write_json

    (tmp_path / "real.json").write_text("{}")
    os.symlink("real.json", tmp_path / "link.json")
    write_json(tmp_path / "link.json", {"new": 1})
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == '{\n  "new": 1\n}\n'


def test_the_current_directory_is_never_replaced(tmp_path, existing, monkeypatch):
    monkeypatch.chdir(existing / "evals")
    for path in (".", "..", existing):
        with pytest.raises(ValueError, match="the current directory is inside it"):
            with atomic_directory(path):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_new_files_follow_the_umask_and_replaced_ones_keep_their_mode(tmp_path):
    from msfp.fileio import atomic_path

    old_mask = os.umask(0o077)
    try:
        with atomic_path(tmp_path / "new.json") as tmp:
            tmp.write_text("{}")
        with atomic_directory(tmp_path / "newdir") as tmp:
            write(tmp, weights="w")
    finally:
        os.umask(old_mask)
    assert os.stat(tmp_path / "new.json").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "newdir").st_mode & 0o777 == 0o700
    with atomic_directory(tmp_path / "saved") as tmp:  # safetensors creates 0600 files whatever the umask
        save_file({"w": torch.zeros(1)}, tmp / "model.safetensors")
    assert os.stat(tmp_path / "saved" / "model.safetensors").st_mode & 0o777 == 0o666 & ~old_mask
    (tmp_path / "private.json").write_text("{}")
    os.chmod(tmp_path / "private.json", 0o640)
    with atomic_path(tmp_path / "private.json") as tmp:  # used to come back 0644
        tmp.write_text('{"a": 1}')
    assert os.stat(tmp_path / "private.json").st_mode & 0o777 == 0o640


def test_data_reaches_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    from msfp.fileio import atomic_path

    events = []
    real_fsync, real_replace = fileio._fsync, os.replace
    monkeypatch.setattr(fileio, "_fsync", lambda p: (events.append(("fsync", p.name)), real_fsync(p)))
    monkeypatch.setattr(fileio.os, "replace",
                        lambda src, dst: (events.append(("replace", os.path.basename(dst))), real_replace(src, dst)))
    real_chmod = os.chmod
    monkeypatch.setattr(fileio.os, "chmod", lambda p, m, **kw: (events.append(("chmod", os.path.basename(p))),
                                                                real_chmod(p, m, **kw)))
    with atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    # Flushed before it gets the final mode, which may not let us open it (a 0200 file being replaced).
    assert events == [("fsync", tmp.name), ("chmod", tmp.name), ("replace", "a.json"), ("fsync", tmp_path.name)]

    for carried in ([], ["evals"]):  # a new directory, then replacing it: the user's evals/ is carried over
        for name in carried:
            (tmp_path / "model" / name).mkdir()
        events.clear()
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "sub").mkdir()
            write(tmp, weights="w")
            write(tmp / "sub", config="c")
        flushed = {name for kind, name in events[:events.index(("replace", "model"))] if kind == "fsync"}
        assert {"weights", "config", "sub", tmp.name, *carried} <= flushed
        assert events[-1] == ("fsync", tmp_path.name)


KILLED_WRITER = """
import sys, time
from pathlib import Path
from msfp.fileio import atomic_directory, atomic_path
with atomic_directory(sys.argv[1]) as tmp, atomic_path(sys.argv[2]) as f:
    (tmp / "weights").write_text("half")
    f.write_text("half")
    Path(sys.argv[3]).touch()
    time.sleep(60)
"""


def test_what_a_killed_writer_left_is_cleared_by_the_next_write_and_a_live_writers_files_are_not(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from msfp.fileio import atomic_path

    model, results, ready = tmp_path / "model", tmp_path / "results.json", tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(model), str(results), str(ready)])
    for _ in range(600):
        if ready.exists() or writer.poll() is not None:
            break
        time.sleep(0.05)
    assert ready.exists(), "the writer did not start"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    ready.unlink()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(f".tmp-{fileio._HOST}-{writer.pid}-" in name for name in left)

    live = tmp_path / f"{fileio._leftover_prefix(model)}{os.getppid()}-x"  # a process that is still running
    other_host = tmp_path / f".model.tmp-otherhost-{writer.pid}-x"
    live.mkdir(), other_host.mkdir()
    with atomic_directory(model) as tmp:
        write(tmp, weights="whole")
    with atomic_path(results) as tmp:
        tmp.write_text("{}")
    assert tree(model) == {"weights": "whole"} and results.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name, "model", "results.json"])


LONG_WRITER = """
import sys, time
from pathlib import Path
from msfp.fileio import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("first")
    Path(sys.argv[2]).touch()
    for _ in range(1200):  # until told to finish: a fixed sleep raced the other writer's start-up on a busy machine
        if Path(sys.argv[3]).exists():
            break
        time.sleep(0.05)
"""


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare to start a process in another PID namespace")
def test_a_writer_in_another_pid_namespace_does_not_clear_a_live_writers_temporary(tmp_path):
    # Containers sharing a hostname (host networking) do not share pids: the live writer's pid, looked up from the
    # other namespace, seemed dead, and its temporary file was removed under it.
    import subprocess
    import sys
    import time

    target, ready, finish = tmp_path / "cache.bin", tmp_path / "ready", tmp_path / "finish"
    writer = subprocess.Popen([sys.executable, "-c", LONG_WRITER, str(target), str(ready), str(finish)])
    for _ in range(600):
        if ready.exists() or writer.poll() is not None:
            break
        time.sleep(0.05)
    other = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c",
                            "import sys; from msfp.fileio import write_json; write_json(sys.argv[1], 'second')",
                            str(target)], capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    finish.touch()  # the live writer finishes after the other one, with its temporary file intact
    assert writer.wait(timeout=60) == 0 and target.read_text() == "first"


@pytest.mark.skipif(os.name != "posix", reason="exclusive_run locks with fcntl")
def test_folders_made_for_a_lock_are_removed_when_the_run_leaves_them_empty(tmp_path):
    # A refused run (a mistyped preset or model) left its output's new parent folders behind, empty.
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError):
        with fileio.exclusive_run(tmp_path / "kept" / "a" / "b" / "out", "test"):
            raise ValueError("refused")
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []  # it existed before: kept
    # Folders the run wrote into stay, whatever the outcome; so do the folders around them.
    for fail in (False, True):
        try:
            with fileio.exclusive_run(tmp_path / "x" / "y" / "out", "test"):
                (tmp_path / "x" / "note").write_text("")
                if fail:
                    raise ValueError("refused")
        except ValueError:
            pass
        assert sorted(os.listdir(tmp_path / "x")) == ["note"]


@pytest.mark.skipif(os.name != "posix", reason="exclusive_run locks with fcntl")
def test_a_lock_folder_removed_by_another_run_is_made_again(tmp_path, monkeypatch):
    # Another run removes the empty folder it made just after this one's mkdir: the open failed with a bare
    # FileNotFoundError. Simulated by removing the folder before the first open.
    opened = []

    def open_after_removal(path, *args, **kwargs):
        if not opened:
            Path(path).parent.rmdir()
        opened.append(path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(fileio, "open", open_after_removal, raising=False)
    with fileio.exclusive_run(tmp_path / "new" / "out", "test"):
        assert (tmp_path / "new" / ".out.lock").is_file()
    assert len(opened) == 2 and not (tmp_path / "new").exists()
