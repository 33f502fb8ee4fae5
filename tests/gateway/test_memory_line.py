"""A server says when it answers where its resident memory goes (`gateway_ready`'s `memory`): the weights and KV
caches of the engines in its process apart from the rest, or its RSS alone when none runs there."""

from __future__ import annotations

import re

from sagellm.gateway.server import process_memory

GIB = r"\d+\.\d\d GiB"


def test_a_server_with_its_engine_here_splits_its_memory(gateway) -> None:
    line = process_memory(gateway.gateway.core)
    kv = rf"KV cache {GIB} reserved \([\d,]+ tokens\) {GIB} mapped"
    assert re.fullmatch(rf"weights {GIB}, {kv}, other {GIB}, RSS {GIB}", line), line


def test_a_server_without_an_engine_here_says_its_rss() -> None:
    class RemoteOnly:  # a core whose graph's engines all run elsewhere
        def engine_operators(self) -> list:
            return []

    assert re.fullmatch(f"RSS {GIB}", process_memory(RemoteOnly())), process_memory(RemoteOnly())
