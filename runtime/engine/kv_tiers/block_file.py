"""One KV block in one file: a header that says exactly what the bytes are, then the payload.

A block file must be trusted by an engine that did not write it (another instance on the host, or this one after a
restart), so its header carries everything the block's name was computed from, and the reader re-derives the name
instead of believing the file's: the identity of the KV layout (a sha256 of the writer's identity JSON), the group and
the chained hash, and the (parent, tokens, extra) that `prefix_hash.hash_block` turns into that hash. Two CRC32s catch
a torn or flipped byte, one over the header and one over the payload. The bytes hold no time and no writer id, so two
instances that store the same block write the same file, and whichever publishes first wins harmlessly.

Layout, little-endian: magic b"SGKV" | u16 format | u16 flags | u32 header_len | 32 B identity sha256 | u8 group |
u64 hash | u64 parent | u32 n_tokens | i64 tokens[n] | u32 extra_len | extra | u64 payload_len | u32 payload_crc32 |
zero padding | u32 header_crc32 (of every header byte before it; the header is padded to a multiple of 64 bytes) |
payload."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from io import FileIO

from sagellm.common.errors import ProtocolError
from sagellm.runtime.engine.prefix_hash import hash_block

MAGIC = b"SGKV"
FORMAT = 1
GROUPS = ("f", "s", "r")  # full-attention KV, sliding-window KV, recurrent states after the prefix
HEADER_ALIGN = 64
MAX_HEADER_BYTES = 1 << 20  # a header_len above this is a flipped bit, not a block of 130k tokens

_FIXED = struct.Struct("<4sHHI")  # magic, format, flags, header_len: enough to know how much header to read
_NAME = struct.Struct("<32scQQI")  # identity sha256, group, hash, parent, n_tokens
_LENGTH = struct.Struct("<I")  # extra_len, and the header CRC at the header's end
_PAYLOAD = struct.Struct("<QI")  # payload_len, payload_crc32
_U64 = 1 << 64


@dataclass(frozen=True)
class BlockKey:
    """What a block is called in every tier: its group (which layers' state it holds) and its chained hash."""

    group: str
    block_hash: int

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"BlockKey.group must be one of {GROUPS}, got {self.group!r}")
        if not 0 <= self.block_hash < _U64:
            raise ValueError(f"BlockKey.block_hash must be a u64, got {self.block_hash}")


@dataclass(frozen=True)
class BlockMeta:
    """What the block's hash was computed from; stored in the file so a reader can re-derive the name."""

    parent: int
    tokens: tuple[int, ...]
    extra: bytes = b""  # media keys (prefix_hash.media_keys)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(int(token) for token in self.tokens))  # lists and tensors compare too


class BadBlock(ProtocolError):
    """A block file that must not be served (what another writer, a crash or another model left there); `why` is the
    metric's label: truncated, corrupt, foreign or mismatch."""

    def __init__(self, why: str, detail: str) -> None:
        super().__init__(f"{why}: {detail}")
        self.why = why


def check_name(key: BlockKey, meta: BlockMeta) -> None:
    """Refuse to store a block under a hash its (parent, tokens, extra) do not give: every reader would refuse it."""
    derived = hash_block(meta.parent, meta.tokens, meta.extra)
    if derived != key.block_hash:
        raise ValueError(
            f"block {key.block_hash:016x} ({key.group}): hash_block(parent, tokens, extra) is {derived:016x}; "
            "pass the meta the hash was computed from"
        )


def encode_header(identity_sha: bytes, key: BlockKey, meta: BlockMeta, payload_len: int, payload_crc: int) -> bytes:
    """The header bytes that precede a payload of `payload_len` bytes whose zlib.crc32 is `payload_crc`."""
    n = len(meta.tokens)
    body = (
        _NAME.pack(identity_sha, key.group.encode(), key.block_hash, meta.parent, n)
        + struct.pack(f"<{n}q", *meta.tokens)
        + _LENGTH.pack(len(meta.extra))
        + meta.extra
        + _PAYLOAD.pack(payload_len, payload_crc)
    )
    unpadded = _FIXED.size + len(body) + _LENGTH.size
    header_len = -(-unpadded // HEADER_ALIGN) * HEADER_ALIGN
    head = _FIXED.pack(MAGIC, FORMAT, 0, header_len) + body + bytes(header_len - unpadded)
    return head + _LENGTH.pack(zlib.crc32(head))


def read_block(file: FileIO, identity_sha: bytes, key: BlockKey, meta: BlockMeta, out: memoryview) -> None:
    """Read the block file open (unbuffered) in `file` straight into `out` (writable bytes of the payload's size), or
    raise BadBlock saying why it must not be served. `out` holds garbage after a BadBlock."""
    size = os.fstat(file.fileno()).st_size
    header_len, stored_key, stored_meta, payload_len, payload_crc = read_header(file, identity_sha, size)
    if stored_key != key:
        raise BadBlock("mismatch", f"file holds {stored_key}, its name says {key}")
    if stored_meta != meta:
        raise BadBlock("mismatch", "stored (parent, tokens, extra) differ from the chain being loaded")
    if payload_len != len(out):
        raise BadBlock("mismatch", f"payload is {payload_len} bytes, this engine's block is {len(out)}")
    if size != header_len + payload_len:
        why = "truncated" if size < header_len + payload_len else "corrupt"
        raise BadBlock(why, f"{size} bytes, header and payload make {header_len + payload_len}")
    _read_exactly_into(file, out)
    if zlib.crc32(out) != payload_crc:
        raise BadBlock("corrupt", "payload CRC32")


def read_header(file: FileIO, identity_sha: bytes, size: int) -> tuple[int, BlockKey, BlockMeta, int, int]:
    """(header length, key, meta, payload length, payload CRC) of the block file open in `file` (`size` bytes), its
    header checked (`check_header`), or BadBlock."""
    fixed = _read_exactly(file, _FIXED.size)
    header_len = _header_length(fixed)
    if size < header_len:
        raise BadBlock("truncated", f"{size} bytes, header alone is {header_len}")
    return header_len, *check_header(fixed + _read_exactly(file, header_len - _FIXED.size), identity_sha)


def check_header(header: bytes, identity_sha: bytes) -> tuple[BlockKey, BlockMeta, int, int]:
    """(key, meta, payload length, payload CRC) of a whole header (a file's, or one another instance sent: peer
    fetches carry the same bytes), checked: magic, length, CRC, our identity, the hash of what it names; or
    BadBlock."""
    header_len = _header_length(header[: _FIXED.size])
    if len(header) != header_len:
        raise BadBlock("truncated", f"header of {len(header)} bytes, its length field says {header_len}")
    if zlib.crc32(memoryview(header)[: -_LENGTH.size]) != _LENGTH.unpack_from(header, header_len - _LENGTH.size)[0]:
        raise BadBlock("corrupt", "header CRC32")
    stored_sha, stored_key, stored_meta, payload_len, payload_crc = _parse(header)
    if stored_sha != identity_sha:
        raise BadBlock("foreign", f"identity sha256 {stored_sha.hex()[:16]}…, ours {identity_sha.hex()[:16]}…")
    if hash_block(stored_meta.parent, stored_meta.tokens, stored_meta.extra) != stored_key.block_hash:
        raise BadBlock("corrupt", "hash_block(parent, tokens, extra) is not the stored hash")
    return stored_key, stored_meta, payload_len, payload_crc


def _header_length(fixed: bytes) -> int:
    """The header's length from its first fixed bytes (magic, format and length checked)."""
    if len(fixed) < _FIXED.size:
        raise BadBlock("truncated", f"{len(fixed)} bytes, a header starts with {_FIXED.size}")
    magic, fmt, _flags, header_len = _FIXED.unpack(fixed)
    if magic != MAGIC or fmt != FORMAT:
        raise BadBlock("corrupt", f"magic {magic!r} format {fmt}, expected {MAGIC!r} format {FORMAT}")
    if header_len % HEADER_ALIGN or not _FIXED.size + _NAME.size < header_len <= MAX_HEADER_BYTES:
        raise BadBlock("corrupt", f"header_len {header_len}")
    return header_len


def _parse(header: bytes) -> tuple[bytes, BlockKey, BlockMeta, int, int]:
    """The fields of a header whose CRC holds; a CRC-valid header that does not parse was written wrong: corrupt."""
    try:
        sha, group, block_hash, parent, n = _NAME.unpack_from(header, _FIXED.size)
        tokens = struct.unpack_from(f"<{n}q", header, _FIXED.size + _NAME.size)
        (extra_len,) = _LENGTH.unpack_from(header, _FIXED.size + _NAME.size + 8 * n)
        extra_at = _FIXED.size + _NAME.size + 8 * n + _LENGTH.size
        if extra_at + extra_len + _PAYLOAD.size > len(header) - _LENGTH.size:
            raise struct.error("the fields run into the header CRC")
        extra = header[extra_at : extra_at + extra_len]
        payload_len, payload_crc = _PAYLOAD.unpack_from(header, extra_at + extra_len)
        key = BlockKey(group.decode("latin-1"), block_hash)
    except (struct.error, ValueError) as error:
        raise BadBlock("corrupt", f"header fields: {error}") from None
    return sha, key, BlockMeta(parent, tokens, extra), payload_len, payload_crc


def _read_exactly(file: FileIO, n: int) -> bytes:
    data = bytearray(n)
    _read_exactly_into(file, memoryview(data))
    return bytes(data)


def _read_exactly_into(file: FileIO, out: memoryview) -> None:
    """readinto until `out` is full (one read returns at most ~2 GiB); end of file first means a cut file."""
    done = 0
    while done < len(out):
        got = file.readinto(out[done:])
        if not got:
            raise BadBlock("truncated", f"file ends {len(out) - done} bytes early")
        done += got
