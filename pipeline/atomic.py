"""Whole-file commits on local disk: a reader sees no file or the whole file, never a part.

The one writer for every local file the package commits (checkpoints, the store's Parquet and
JSON files): write a temp file in the target's folder, fsync it, `os.replace` it over the
target (atomic within one filesystem, which the shared folder guarantees), then fsync the
folder so that the rename itself survives a crash. `check_writable` tells, before any work and
writing nothing, whether a command could write a folder or file there.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import ConfigError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, exclusive: bool = False) -> None:
    """Commit the bytes `write(f)` puts into the binary file f as `path`, atomically.

    The folder is created if missing. The file gets the usual umask permissions (the temp file
    is opened with "xb", not mkstemp, which would leave it 0600). On any error the temp file is
    removed and the target is left as it was. exclusive: FileExistsError if `path` exists (the
    temp file is hard-linked into place, which, unlike a rename, never replaces a file).
    """
    path = os.fspath(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    # The dot-name and .tmp suffix keep the temp file out of listings.
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries: a rename is durable only once its directory is (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and platforms) refuse fsync on directories
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike, field: str, *, file: bool = False) -> None:
    """ConfigError naming `field` and the path when a command could not write the folder
    `path` (or with file, the file `path`): a file where a folder is needed or the reverse, a
    symbolic link loop, a read-only or foreign folder. Nothing is written; absent folders are
    fine where their nearest existing parent can be written."""
    target = Path(path).absolute()
    folder = target.parent if file else target
    existing = Path(folder.anchor)
    for p in list(reversed(folder.parents)) + [folder]:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            break
        except OSError as exc:  # ELOOP (a symbolic link loop), EACCES
            raise ConfigError(f"{field}: cannot use {p} as a folder: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{field}: {p} is a file, not a folder")
        existing = p
    if file:
        try:
            st = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise ConfigError(f"{field}: cannot write {target}: {exc.strerror}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{field}: {target} is a folder; give a file name")
        if st is not None and not os.access(target, os.W_OK):
            raise ConfigError(f"{field}: {target} is read-only (or not writable by this user)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: {existing} is read-only (or not writable by this user); give a place that can be "
                          f"written")


__all__ = ["atomic_write", "check_writable", "fsync_dir"]
