"""Records the gateway keeps as JSON files under its state directory (files, batches, stored responses), read back
when it starts: one that cannot be read (damaged by hand, or cut by a full disk) is skipped and said in the log, so
a store starts with the rest rather than not at all."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import msgspec
import structlog

Record = TypeVar("Record")
log = structlog.get_logger("sagellm.gateway")


def kept_records(root: Path, pattern: str, kind: type[Record]) -> list[Record]:
    """The records `root` keeps as `pattern` files, in name order."""
    records = []
    for path in sorted(root.glob(pattern)) if root.is_dir() else ():
        try:
            records.append(msgspec.json.decode(path.read_bytes(), type=kind))
        except (OSError, msgspec.DecodeError) as error:
            log.warning("record_unreadable", path=str(path), problem=str(error))
    return records
