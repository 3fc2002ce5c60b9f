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


class OutputWriteError(OSError):
    """Writing an output failed (disk full, read-only folder, ...); the old file, if any, is intact."""


def check_writable(path: Path, overwrite: bool, example: str | None = None) -> None:
    """Refuse before any work starts: a folder where a file is to be written (no overwrite can
    replace it), an existing output without overwrite, a missing folder, or a folder in which no
    file can be created (read-only, no permission). `example`: a file name to suggest."""
    path = Path(path)
    if path.is_dir():
        inside = f" (e.g. {path / example})" if example else ""
        raise OutputExistsError(f"{path} is a folder; give the name of the file to write{inside}.")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another name or allow overwriting "
                                "(--overwrite on the CLI, the overwrite option on the node).")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} for output {path.name} does not exist; "
                                "create it first.")
    check_folder_writable(path.parent, path.name)


def check_output_folder(folder: Path, what: str) -> None:
    """A folder to write files into (created when the output is written, not before): it must not
    be a file, and it or its nearest existing parent must be writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{folder} is a file, not a folder; give a folder for {what}.")
    nearest = next(p for p in (folder, *folder.parents) if p.exists())
    if not nearest.is_dir():
        raise OutputExistsError(f"{nearest} is a file, so the folder {folder} for {what} cannot be "
                                "created; give another folder.")
    check_folder_writable(nearest, what)


def check_folder_writable(folder: Path, what: str) -> None:
    """Creates and deletes a probe file, the only check that holds for ACLs, read-only mounts and
    network drives alike (os.access does not)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".iddm-probe-", dir=folder)
    except OSError as err:
        raise OutputWriteError(f"cannot write {what} in {folder} ({err.strerror or err}); choose a "
                               "folder you can write to, or make this one writable.") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temp path beside `path`; on success renames it over `path`, on error deletes it."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise _write_error(path, err) from err
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _write_error(path: Path, err: OSError) -> OutputWriteError:
    return OutputWriteError(f"could not write {path} ({err.strerror or err}); free some disk space or "
                            f"choose a folder you can write to. {path.name} was left as it was.")


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Atomically write `path` with a function that writes to a given path (e.g. safetensors.save_file)."""
    with atomic_path(path) as tmp:
        writer(tmp)
