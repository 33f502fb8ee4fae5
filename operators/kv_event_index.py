"""Which prompt prefixes each engine instance holds, known from the instances themselves: their KV events.

`PrefixIndex` guesses from what was sent where; an instance whose engine publishes KV events (`kv_events_config`,
vLLM's format: kv_events/) says exactly which blocks it holds, in its pages and in the tiers under them (RAM, disk),
so a prompt sent elsewhere, a prefix evicted, a restart (the gateway's memory of its sends is gone, the instances'
disks are not) are all seen. For such an instance this index follows its stream (a thread per instance: a ZeroMQ
subscriber that heals its gaps by replay or snapshot) and counts a block cached when the instance holds it in any
medium: loading from RAM or disk costs a small fraction of computing it (`sagellm bench agents`). A prompt sent in the
last few seconds counts too, since its events follow a step later. An instance without events keeps the estimate.

Knowing who holds what, it also says when another instance holds more of a prompt than the one chosen for it
(`peer_prefix`): the chosen engine fetches those blocks from it (kv_tiers/peer_blocks.py) instead of computing them."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import structlog

from sagellm.common.errors import Unavailable
from sagellm.operators.prefix_index import PrefixIndex
from sagellm.runtime.engine.kv_events.subscriber import KvEventSubscriber
from sagellm.runtime.engine.peer_prefix import PeerPrefix
from sagellm.runtime.pipeline.operator import InstanceStats

log = structlog.get_logger("sagellm.route")

RECENT_S = 5.0  # how long a prompt just sent counts as held where it went, before its events arrive
RETRY_S = 1.0  # how soon a feed whose publisher did not answer tries again
PEER_GAIN_BLOCKS = 4  # how many more blocks another instance must hold for the chosen one to fetch them from it


class _Feed:
    """One instance's events, followed in a thread: the blocks it holds per (medium, group)."""

    def __init__(self, instance: str, endpoint: str, replay_endpoint: str | None) -> None:
        self.instance, self.endpoint, self.replay_endpoint = instance, endpoint, replay_endpoint
        self.subscriber: KvEventSubscriber | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{instance}", daemon=True)
        self._thread.start()

    def holds(self, block_hash: int) -> bool:
        """Whether the instance holds the block (group 0: every layer's, or the full-attention layers') anywhere."""
        subscriber = self.subscriber
        if subscriber is None:
            return False
        return any(block_hash in held for (_, group), held in list(subscriber.blocks.sets.items()) if group == 0)

    @property
    def synced(self) -> bool:
        return self.subscriber is not None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        """Subscribes (again, after a broken stream: from a snapshot) and applies batches as they come."""
        while not self._stop.is_set():
            if self.subscriber is None:
                try:
                    self.subscriber = KvEventSubscriber(self.endpoint, self.replay_endpoint, timeout_s=2.0)
                except Unavailable:
                    self._stop.wait(RETRY_S)
                    continue
                log.info("kv_events_followed", instance=self.instance, endpoint=self.endpoint)
            try:
                self.subscriber.poll(0.2)
            except Exception as error:
                log.warning("kv_events_feed_broken", instance=self.instance, error=repr(error))
                self.subscriber.close()
                self.subscriber = None
        if self.subscriber is not None:
            self.subscriber.close()


class EventIndex(PrefixIndex):
    """`PrefixIndex` that reads an instance's own events where it publishes them (`follow`)."""

    def __init__(self, block_size: int = 16, max_blocks_per_instance: int = 100_000) -> None:
        super().__init__(block_size, max_blocks_per_instance)
        self._feeds: dict[str, _Feed] = {}
        self._recent: dict[str, OrderedDict[int, float]] = {}  # instance -> block hash -> when it was sent there

    def follow(self, instances: Iterable[InstanceStats]) -> None:
        """Follows the events of each of `instances` that publishes them (once; again where its endpoint changed:
        an engine started anew)."""
        for stats in instances:
            endpoint = stats.kv_events_endpoint
            feed = self._feeds.get(stats.name)
            if endpoint is None or (feed is not None and feed.endpoint == endpoint):
                continue
            if feed is not None:
                feed.close()
            self._feeds[stats.name] = _Feed(stats.name, endpoint, stats.kv_events_replay_endpoint)

    def follows(self, instance: str) -> bool:
        """Whether `instance`'s holdings come from its events (once its feed has synced), not the estimate."""
        feed = self._feeds.get(instance)
        return feed is not None and feed.synced

    def cached_tokens(self, instance: str, token_ids: Sequence[int], hashes: list[int] | None = None) -> int:
        if not self.follows(instance):
            return super().cached_tokens(instance, token_ids, hashes)
        hashes = self.hashes(token_ids) if hashes is None else hashes
        return self._held_blocks(instance, hashes, recent=True) * self.block_size

    def _held_blocks(self, instance: str, hashes: list[int], recent: bool) -> int:
        """How many of `hashes`, from the first, `instance`'s events say it holds; with `recent`, those just sent to
        it count too (their events follow a step later)."""
        feed = self._feeds.get(instance)
        if feed is None:
            return 0
        sends, now, held = self._recent.get(instance, {}) if recent else {}, time.monotonic(), 0
        for block_hash in hashes:
            sent = sends.get(block_hash)
            if not (feed.holds(block_hash) or (sent is not None and now - sent < RECENT_S)):
                break
            held += 1
        return held

    def peer_prefix(
        self, chosen: InstanceStats, instances: Iterable[InstanceStats], hashes: list[int]
    ) -> PeerPrefix | None:
        """The instance among `instances` that its events say holds the most more of the prompt (block `hashes`)
        than `chosen` holds, at least `PEER_GAIN_BLOCKS` more, where both serve and fetch blocks; None otherwise."""
        if chosen.kv_blocks_endpoint is None or not self.follows(chosen.name):
            return None
        own = self._held_blocks(chosen.name, hashes, recent=True)
        best: tuple[int, InstanceStats] | None = None
        for stats in instances:
            if stats.name == chosen.name or not stats.healthy or stats.kv_blocks_token is None:
                continue
            held = self._held_blocks(stats.name, hashes, recent=False)  # only what it holds can be fetched
            if held >= own + PEER_GAIN_BLOCKS and (best is None or held > best[0]):
                best = held, stats
        if best is None:
            return None
        held, stats = best
        return PeerPrefix(stats.name, stats.kv_blocks_endpoint, stats.kv_blocks_token, held)

    def record(self, instance: str, token_ids: Sequence[int], hashes: list[int] | None = None) -> None:
        hashes = self.hashes(token_ids) if hashes is None else hashes
        super().record(instance, token_ids, hashes)
        if instance in self._feeds:
            recent, now = self._recent.setdefault(instance, OrderedDict()), time.monotonic()
            for block_hash in hashes:
                recent[block_hash] = now
                recent.move_to_end(block_hash)
            while recent and now - next(iter(recent.values())) > RECENT_S:
                recent.popitem(last=False)

    def close(self) -> None:
        for feed in self._feeds.values():
            feed.close()
        self._feeds.clear()
