"""Where another engine instance holds more of a prompt's prefix than the instance chosen to run it: the router's
word (route reads every instance's KV events), carried with the request, so the chosen engine fetches those blocks
from that instance's pages and tiers (kv_tiers/peer_blocks.py) instead of computing them.

It names an endpoint to connect to, so only the router sets it, from what the instances published about themselves
(`InstanceStats.kv_blocks_endpoint` and the token that endpoint asks for): no API field reaches it. A fetch that
fails, times out or returns a block that does not check out costs the wait and nothing else: the prompt is computed
from where the blocks stopped."""

from __future__ import annotations

import msgspec


class PeerPrefix(msgspec.Struct, frozen=True, array_like=True):
    """`blocks` full blocks of the prompt's chain are held by instance `instance`, served at `endpoint` to callers
    that present `token`."""

    instance: str
    endpoint: str
    token: str
    blocks: int
