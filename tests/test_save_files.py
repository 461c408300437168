"""Where a save writes: clear errors for paths that are not files, and no temporaries left behind
by a save that was killed (the next save of the same target removes them)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import earlyexit as ee
from earlyexit.errors import ConfigError
from earlyexit.io import STALE_TEMPORARY_S, write_atomic

fcntl = pytest.importorskip("fcntl")  # the lock a save holds: POSIX


@pytest.fixture
def eem(resnet) -> ee.EarlyExitModel:
    return ee.wrap(resnet, input_size=(3, 64, 64))


@pytest.mark.parametrize("path", ["", "{tmp}", "{tmp}/.."])
def test_save_to_an_empty_path_or_a_folder_is_a_clear_error(eem, tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="expected a file path"):
        eem.save(path.format(tmp=tmp_path))
    with pytest.raises(ValueError, match="expected a file path"):  # ConfigError is a ValueError
        write_atomic(path.format(tmp=tmp_path), b"data")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def _temporary(target: Path, tag: str, age_s: float) -> Path:
    """A temporary of ``target`` as a save writes it, last modified ``age_s`` seconds ago."""
    path = target.parent / f".{target.name}.{tag}.tmp"
    path.write_bytes(b"half a file")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_save_removes_stale_temporaries_of_its_target_only(eem, tmp_path):
    target = tmp_path / "heads.safetensors"
    old = STALE_TEMPORARY_S + 60
    killed = [_temporary(target, tag, old) for tag in ("abc123_x", "k9ycb2zq")]
    recent = _temporary(target, "n3wsave1", 1.0)  # may be a save in progress: kept
    others = [
        _temporary(tmp_path / "heads.safetensors.bak", "abc123_x", old),  # another target
        _temporary(tmp_path / "heads", "abc123_x", old),
        tmp_path / f".{target.name}.abc.def.tmp",  # not the pattern (a dot in the tag)
        tmp_path / f"{target.name}.abc123_x.tmp",  # not hidden: not ours
    ]
    for path in others[2:]:
        path.write_bytes(b"x")
        os.utime(path, (time.time() - old, time.time() - old))
    eem.save(target)
    assert ee.load(eem.base_model, target).num_exits == eem.num_exits
    assert not any(path.exists() for path in killed)
    assert recent.exists() and all(path.exists() for path in others)
    kept = [target, recent, *others]  # and the save's own temporary is gone
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_a_temporary_that_a_live_save_holds_is_never_removed(tmp_path):
    # A save locks its temporary until the rename; a killed process's lock goes with it.
    # Another process (here: another open file) holding the lock means the save is alive,
    # however old the file looks.
    target = tmp_path / "learner.safetensors"
    live = _temporary(target, "live0001", STALE_TEMPORARY_S * 10)
    with open(live, "r+b") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        write_atomic(target, b"new contents")
        assert live.exists()
    write_atomic(target, b"newer contents")  # the writer is gone now: removed
    assert not live.exists() and target.read_bytes() == b"newer contents"


def test_a_save_holds_its_temporary_locked_until_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "heads.safetensors"
    seen: dict[str, bool] = {}
    replace = os.replace

    def checking_replace(src, dst):
        with open(src, "rb") as other:  # another open file of the temporary: the lock is held
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen["locked"] = False
            except BlockingIOError:
                seen["locked"] = True
        replace(src, dst)

    monkeypatch.setattr(os, "replace", checking_replace)
    write_atomic(target, b"contents")
    assert seen == {"locked": True} and target.read_bytes() == b"contents"


def test_a_folder_or_link_named_like_a_temporary_is_left_alone(tmp_path):
    target = tmp_path / "heads.safetensors"
    folder = tmp_path / f".{target.name}.folder01.tmp"
    folder.mkdir()
    outside = _temporary(tmp_path / "elsewhere", "abc123_x", STALE_TEMPORARY_S + 60)
    link = tmp_path / f".{target.name}.link0001.tmp"
    link.symlink_to(outside)
    os.utime(link, (0, 0), follow_symlinks=False)
    write_atomic(target, b"data")
    assert folder.is_dir() and link.is_symlink() and outside.exists()


def test_write_atomic_still_replaces_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"two" and sorted(os.listdir(target.parent)) == ["file.bin"]


_STUCK_SAVE = """
import os, sys, time
from earlyexit import io
def stuck(src, dst):  # written, fsynced and locked, never renamed: as if killed right here
    print(src, flush=True)
    time.sleep(600)
io.os.replace = stuck
io.write_atomic(sys.argv[1], b"x" * 1000)
"""


def test_a_killed_save_is_cleaned_up_but_not_while_it_runs(tmp_path):
    target = tmp_path / "heads.safetensors"
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    saver = subprocess.Popen(
        [sys.executable, "-c", _STUCK_SAVE, str(target)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        temporary = Path(saver.stdout.readline().strip())
        assert temporary.name.startswith(f".{target.name}.") and temporary.exists()
        then = time.time() - 10 * STALE_TEMPORARY_S
        os.utime(temporary, (then, then))  # old, but its process is alive: kept
        write_atomic(target, b"first")
        assert temporary.exists()
    finally:
        saver.kill()  # SIGKILL: no cleanup runs in the saver
        saver.wait(timeout=60)
    write_atomic(target, b"second")
    assert not temporary.exists() and target.read_bytes() == b"second"
    assert sorted(tmp_path.iterdir()) == [target]
