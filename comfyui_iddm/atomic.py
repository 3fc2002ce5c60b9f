"""Atomic file output: a temp file in the destination folder, then one rename.

A crash, a full disk or Ctrl-C leaves either the old file or the new one, never half a file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


class OutputExistsError(FileExistsError):
    pass


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse before any work starts: an existing output without overwrite, or a missing folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another name or allow overwriting "
                                "(--overwrite on the CLI, the overwrite option on the node).")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} for output {path.name} does not exist; "
                                "create it first.")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temp path beside `path`; on success renames it over `path`, on error deletes it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Atomically write `path` with a function that writes to a given path (e.g. safetensors.save_file)."""
    with atomic_path(path) as tmp:
        writer(tmp)
