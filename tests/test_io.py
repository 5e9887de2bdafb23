"""Atomic folder writes (``mora_dist.io.atomic_write_dir``), which adapters and checkpoints are written with."""

from __future__ import annotations

import os

import pytest

from mora_dist.io import atomic_write_dir, recover_dir


def test_atomic_write_dir_writes_replaces_and_leaves_nothing_beside(tmp_path):
    target = tmp_path / "ad"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("one"))
    atomic_write_dir(target, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"] and (target / "b.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary or old folder left


def test_a_failed_fill_keeps_the_old_folder(tmp_path):
    target = tmp_path / "ad"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("one"))

    def fill(d):
        (d / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(target, fill)
    assert (target / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_recover_dir_puts_back_a_folder_a_crash_left_aside(tmp_path):
    """A crash between the two renames leaves only ``.NAME.old-PID``; the next read or write restores it."""
    target = tmp_path / "ad"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("one"))
    os.replace(target, tmp_path / ".ad.old-123")
    recover_dir(target)
    assert (target / "a.txt").read_text() == "one" and not (tmp_path / ".ad.old-123").exists()
    recover_dir(tmp_path / "never-written")  # nothing to recover: no error
    assert not (tmp_path / "never-written").exists()
