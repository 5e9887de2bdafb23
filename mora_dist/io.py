"""Atomic file and folder writes: a temporary file (or folder) beside the target, fsync, then ``os.replace``.

A crash at any moment leaves either the old file or the new one, never a partial file; for folders, either the
old folder or the new one (``recover_dir`` finishes a replacement a crash interrupted).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from mora_dist.faults import fault_point


def _json_default(obj: Any):
    try:
        import numpy as np

        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, set):
        return sorted(obj)
    return str(obj)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (and durably: the file and its folder are fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=_json_default, ensure_ascii=False) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, with the file and position in the error."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err


def recover_dir(directory: str | os.PathLike) -> None:
    """Finish an interrupted ``atomic_write_dir``: a crash between moving the old folder aside and moving the new
    one in leaves only ``.NAME.old-PID``; put it back."""
    directory = Path(directory)
    if directory.exists() or not directory.parent.is_dir():
        return
    olds = sorted(directory.parent.glob(f".{directory.name}.old-*"))
    if olds:
        os.replace(olds[-1], directory)


def atomic_write_dir(directory: str | os.PathLike, fill: Callable[[Path], None], fault: str | None = None) -> Path:
    """Write a folder atomically: ``fill(tmp)`` writes its files into a temporary folder beside ``directory``;
    they are fsynced, then the folder replaces ``directory`` (if it exists) by two renames.

    Args:
        directory: the folder to write or replace.
        fill: writes the folder's files into the folder it is given.
        fault: name of the fault point passed once the files are written and not yet in place (crash tests,
            ``mora_dist.faults``).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        fill(tmp)
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if fault:
            fault_point(fault)
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
