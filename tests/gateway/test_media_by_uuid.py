"""The files senders name by uuid (`gateway/media/by_uuid.py`): each sender's names are its own, a name sent again
holds the new file, and past the byte cap the least recently used files go."""

from __future__ import annotations

import pytest

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.media.by_uuid import MediaByUuid


def test_a_name_is_its_senders_alone_and_holds_the_file_last_sent_under_it():
    kept = MediaByUuid()
    kept.remember("alice", "image", "cat", b"alice's cat")
    assert kept.recall("alice", "image", "cat", "p") == b"alice's cat"
    with pytest.raises(ApiError, match="p: no image with uuid 'cat' is held for this sender") as other:
        kept.recall("bob", "image", "cat", "p")
    assert other.value.http_status == 400 and other.value.param == "p"
    with pytest.raises(ApiError):
        kept.recall("alice", "audio", "cat", "p")  # names are per modality too
    kept.remember("alice", "image", "cat", b"another cat")
    assert kept.recall("alice", "image", "cat", "p") == b"another cat" and len(kept) == 1


def test_past_the_byte_cap_the_least_recently_used_files_go():
    kept = MediaByUuid(max_bytes=10)
    kept.remember("a", "image", "one", b"1234")
    kept.remember("a", "image", "two", b"1234")
    kept.recall("a", "image", "one", "p")  # "one" is used again: "two" is now the least recent
    kept.remember("a", "image", "three", b"1234")
    assert kept.recall("a", "image", "one", "p") == b"1234" and kept.recall("a", "image", "three", "p") == b"1234"
    with pytest.raises(ApiError):
        kept.recall("a", "image", "two", "p")
