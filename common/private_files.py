"""Files only their owner may read (keys, session state): written atomically with mode 0600, and refused on reading
when anyone else could read them, as ssh refuses a private key others can read."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from sagellm.common.errors import InvalidInput


class OpenFileError(InvalidInput, PermissionError):
    """A private file whose permissions let others read or write it (the message says how to fix it)."""


def write_private(path: Path, data: bytes) -> None:
    """Writes `data` readable by its owner only, atomically: a new file (mode 0600) renamed over `path`, so an
    existing file's looser mode is never kept and a reader never sees half a write."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_private(path: Path) -> bytes:
    """The contents of a file only its owner can read or write; `OpenFileError` if the group or others can (the
    mode is read from the open file, so it is the mode of what is read)."""
    with open(path, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise OpenFileError(
                f"{path} has permissions {mode:04o}, too open for a secret: it must be readable by its owner only "
                f"(chmod 600 {path})"
            )
        return f.read()
