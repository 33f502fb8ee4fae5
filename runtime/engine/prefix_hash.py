"""The one hash that names a prefix of tokens: chained hashes of full blocks, as vLLM's automatic prefix caching.

Block i's hash covers (block i-1's hash, block i's tokens), so one hash names a whole prefix and two prompts share a
block exactly when they share every token up to its end. The engine's block manager finds cached KV by it, and the
control plane (route's cache_aware and locality strategies, pd_split) predicts which engine holds a prefix by it, so
both must compute the same numbers in every process: blake2b, not Python's `hash()` (salted per process for str and
bytes, and only 64 bits of a weak mix for tuples, where a collision would serve another prompt's KV)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from sagellm.common.errors import FieldError

if TYPE_CHECKING:
    from sagellm.runtime.multimodal.media_feature import MediaFeature

ROOT_HASH = 0  # the parent of a prompt's first block


def stable_hash(data: bytes) -> int:
    """64-bit hash that is the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def hash_block(parent: int, tokens: Sequence[int], extra: bytes = b"") -> int:
    """Hash of one block of token ids chained to the hash of the prefix before it; `extra`: what else its tokens
    stand for (media_keys), so a block of an image's placeholders is another block for another image. A block
    without any hashes as it always has."""
    return stable_hash(struct.pack(f"<Q{len(tokens)}q", parent, *tokens) + extra)


def media_keys(features: Iterable[MediaFeature], start: int, end: int) -> bytes:
    """The keys of the media whose placeholders lie in positions [start, end) (vLLM's extra keys): each one's hash
    and where it starts relative to `start`."""
    keys = b""
    for feature in features:
        if feature.overlap(start, end):
            keys += feature.hash + struct.pack("<q", feature.offset - start)
    return keys


def prefix_root(cache_salt: str | None) -> int:
    """The parent of a prompt's first block: ROOT_HASH, or one of the salt's own (vLLM's `cache_salt`), so prompts
    with different salts share no block however equal their tokens (tenants who must not see each other's timing)."""
    return ROOT_HASH if cache_salt is None else stable_hash(b"cache_salt\x00" + cache_salt.encode())


def effective_salt(cache_salt: str | None, lora_name: str | None, lora_digest: str | None) -> str | None:
    """The salt a request's prefix blocks are hashed under: its `cache_salt`, with its LoRA adapter's part. The engine
    (request_intake) and the control plane (route, pd_split) both call this, so they name a request's blocks alike.

    An adapter's KV of a prompt is neither the base model's nor another adapter's, so its part names what the KV
    depends on: `lora_digest`, the digest of its weights and scaling (`lora_digest.adapter_digest`), never its name or
    path (a file replaced under the same path must not find the old file's KV, and equal weights under two names may
    share theirs). Without a digest (a `LoRARequest` made without one, which only the control plane sees: the engine
    always has its adapter's) the part is the name: such prompts still match one another in the router's index,
    though not the engine's blocks.

    The encoding is injective: a NUL of `cache_salt` is doubled, so a plain salt holds only even runs of NULs and an
    adapter's part follows one lone NUL: no salt a client sends can name another request's, or an adapter's, blocks."""
    salt = None if cache_salt is None else _nul_doubled(cache_salt)
    if lora_digest is not None:
        adapter = "lora:" + _nul_doubled(lora_digest)
    elif lora_name is not None:
        adapter = "lora-name:" + _nul_doubled(lora_name)
    else:
        return salt
    return ("-" if salt is None else "+" + salt) + "\x00" + adapter


def block_hashes(token_ids: Sequence[int], block_size: int = 16, cache_salt: str | None = None) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block is never cached, so not hashed)."""
    if block_size < 1:
        raise FieldError("block_size", f"block_size must be >= 1, got {block_size}")
    hashes: list[int] = []
    parent = prefix_root(cache_salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def _nul_doubled(text: str) -> str:
    return text.replace("\x00", "\x00\x00")
