"""KV events in vLLM 0.32.0's wire format: our structs encode the golden batches (written by vLLM's own structs,
scripts/kv_events_golden.py) byte for byte and decode them; the recorder's batches and snapshot imply exactly the
blocks its calls say are held; over real ZeroMQ sockets a subscriber's sets end equal to the recorder's after it was
closed and restarted within the replay ring (replay heals), past it (the snapshot heals) and after falling behind the
high-water mark; vLLM's framing and replay protocol hold on the raw sockets; a bad config names its key."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import zmq

from sagellm.common.errors import FieldError
from sagellm.runtime.engine.kv_events.config import KvEventsConfig, offset_endpoint, parse_kv_events_config
from sagellm.runtime.engine.kv_events.publisher import END_SEQ, SNAPSHOT_SEQ, ZmqKvEventPublisher
from sagellm.runtime.engine.kv_events.recorder import KvEventRecorder
from sagellm.runtime.engine.kv_events.subscriber import BlockSets, KvEventSubscriber
from sagellm.runtime.engine.kv_events.wire import (
    CPU,
    DISK,
    GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode,
    encode,
)

GOLDEN = Path(__file__).parent / "data" / "kv_events"
PLACES = [(GPU, 0), (GPU, 1), (CPU, 0), (DISK, 0)]
BLOCK = 4


# --- golden bytes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN.glob("*.msgpack")))
def test_golden_batches_encode_byte_for_byte_and_decode(name: str) -> None:
    described = json.loads((GOLDEN / f"{name}.json").read_text())
    ours = msgspec.convert(described["batch"], KVEventBatch)  # the same batch, built with our structs
    golden = (GOLDEN / f"{name}.msgpack").read_bytes()
    assert encode(ours) == golden, described["what"]
    assert decode(golden) == ours


def test_golden_files_cover_every_event_and_field() -> None:
    assert len(list(GOLDEN.glob("*.msgpack"))) >= 6
    full = decode((GOLDEN / "stored_full.msgpack").read_bytes()).events[0]
    assert all(getattr(full, field) is not None for field in BlockStored.__struct_fields__)


# --- recorder -------------------------------------------------------------------------------------------------------


def tokens(n_blocks: int, start: int = 70_000) -> list[int]:
    return list(range(start, start + n_blocks * BLOCK))


def random_step(recorder: KvEventRecorder, rng: random.Random, held: dict, hashes: int = 120, size: int = 1) -> None:
    """A few random calls, mirrored in `held` ({place: set}) as the calls mean them, then a flush."""
    for _ in range(rng.randint(0, 4)):
        medium, group = rng.choice(PLACES)
        roll = rng.random()
        if roll < 0.55:
            chain = [rng.randrange(hashes) for _ in range(rng.randint(1, 5))]
            lora = rng.choice([None, "sql"])
            extra = [(lora, "salt") if lora else None for _ in chain] if rng.random() < 0.3 else None
            parent = rng.choice([None, rng.randrange(hashes)])
            recorder.stored(chain, parent, tokens(len(chain) * size), BLOCK * size, medium, group, lora, extra)
            held.setdefault((medium, group), set()).update(chain)
        elif roll < 0.97:
            gone = [rng.randrange(hashes) for _ in range(rng.randint(1, 6))]
            recorder.removed(gone, medium, group)
            held.get((medium, group), set()).difference_update(gone)
        else:
            recorder.cleared()
            for place in [place for place in held if place[0] == GPU]:
                del held[place]
    recorder.flush()


def nonempty(held: dict) -> dict:
    return {place: blocks for place, blocks in held.items() if blocks}


def test_recorder_batches_and_snapshot_imply_the_calls() -> None:
    rng, batches, held = random.Random(66), [], {}
    recorder = KvEventRecorder(batches)
    for _ in range(400):
        random_step(recorder, rng, held)
    assert recorder.live_set() == nonempty(held)

    followed = BlockSets()
    assert [seq for seq, _ in batches] == list(range(len(batches)))
    assert batches[0][1].events == [AllBlocksCleared()]  # a start resets every subscriber
    for _, batch in batches:
        for event in batch.events:  # each event changes the sets: nothing re-sent, no unknown block removed
            place = (event.medium, event.group_idx) if not isinstance(event, AllBlocksCleared) else None
            now = followed.sets.get(place, set())
            if isinstance(event, BlockStored):
                assert not now & set(event.block_hashes) and len(event.token_ids) == BLOCK * len(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                assert set(event.block_hashes) <= now
            followed.apply(KVEventBatch(ts=0.0, events=[event]))
    assert followed.sets == nonempty(held)

    seq, snapshot = recorder.snapshot()
    assert seq == batches[-1][0] == recorder.seq
    from_snapshot = BlockSets()
    from_snapshot.sets[(GPU, 0)] = {10**6}  # stale: the snapshot's AllBlocksCleared drops it
    from_snapshot.apply(snapshot)
    assert from_snapshot.sets == nonempty(held)


def test_one_call_is_one_event_and_known_blocks_are_not_sent_again() -> None:
    batches = []
    recorder = KvEventRecorder(batches)
    recorder.stored([1, 2, 3], None, tokens(3), BLOCK, GPU, lora_name="sql", extra_keys=[("sql",)] * 3, lora_id=1)
    recorder.stored([2, 3, 4, 5], 1, tokens(4, 100), BLOCK, GPU)  # 2, 3 held: only 4, 5, after 3
    recorder.stored([7], None, tokens(1), BLOCK, CPU)
    recorder.removed([9, 1, 1], GPU)  # 9 never held; 1 once
    recorder.removed([7], DISK)  # held in CPU, not DISK
    recorder.flush()
    recorder.flush()  # nothing changed: no batch
    stored, again, ram, removed = batches[1][1].events
    assert (stored.block_hashes, stored.parent_block_hash, stored.lora_name, stored.lora_id) == (
        [1, 2, 3],
        None,
        "sql",
        1,
    )
    assert stored.extra_keys == [("sql",)] * 3 and stored.medium == GPU and stored.group_idx == 0
    assert (again.block_hashes, again.parent_block_hash, again.token_ids) == ([4, 5], 3, tokens(4, 100)[8:])
    assert (ram.block_hashes, ram.medium) == ([7], CPU)
    assert (removed.block_hashes, removed.medium) == ([1], GPU)
    assert len(batches) == 2

    recorder.cleared()  # the pages go; what RAM holds is announced again, since subscribers drop everything
    recorder.flush()
    cleared, ram_again = batches[2][1].events
    assert cleared == AllBlocksCleared() and (ram_again.block_hashes, ram_again.medium) == ([7], CPU)


def test_snapshot_announces_chains_with_their_parents_and_tokens() -> None:
    recorder = KvEventRecorder([])
    recorder.stored([1, 2, 3, 4], 99, tokens(4), BLOCK, DISK, group_idx=1)
    recorder.removed([2], DISK, group_idx=1)
    _, snapshot = recorder.snapshot()
    cleared, head, tail = snapshot.events
    assert cleared == AllBlocksCleared()
    assert (head.block_hashes, head.parent_block_hash, head.token_ids) == ([1], 99, tokens(4)[:BLOCK])
    assert (tail.block_hashes, tail.parent_block_hash, tail.token_ids) == ([3, 4], 2, tokens(4)[2 * BLOCK :])
    assert (tail.medium, tail.group_idx, tail.block_size) == (DISK, 1, BLOCK)


# --- over ZeroMQ ----------------------------------------------------------------------------------------------------


def start(**config: object) -> tuple[KvEventRecorder, ZmqKvEventPublisher]:
    settings = {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:0", "replay_endpoint": "tcp://127.0.0.1:0"}
    recorder: KvEventRecorder | None = None
    publisher = ZmqKvEventPublisher(parse_kv_events_config({**settings, **config}), lambda: recorder.snapshot())
    recorder = KvEventRecorder(publisher)
    return recorder, publisher


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def follow(subscriber: KvEventSubscriber, recorder: KvEventRecorder, timeout_s: float = 20.0) -> None:
    """Polls until the subscriber has applied the recorder's last batch, then checks the sets are the recorder's."""
    deadline = time.monotonic() + timeout_s
    while subscriber.blocks.seq != recorder.seq:
        assert time.monotonic() < deadline, f"at seq {subscriber.blocks.seq} of {recorder.seq}"
        subscriber.poll(0.05)
    assert subscriber.blocks.sets == recorder.live_set()


def drive(
    recorder: KvEventRecorder, rng: random.Random, steps: int, subscriber: KvEventSubscriber | None = None
) -> None:
    for _ in range(steps):
        random_step(recorder, rng, {})
        if subscriber is not None:
            subscriber.poll()


@pytest.mark.parametrize("buffer_steps", [10_000, 4], ids=["replay heals", "snapshot heals"])
def test_a_restarted_subscriber_ends_with_the_recorders_sets(buffer_steps: int) -> None:
    rng = random.Random(buffer_steps)
    recorder, publisher = start(buffer_steps=buffer_steps)
    try:
        subscriber = KvEventSubscriber(publisher.endpoint, publisher.replay_endpoint)
        drive(recorder, rng, 120, subscriber)
        follow(subscriber, recorder)
        blocks, snapshots = subscriber.blocks, subscriber.snapshots
        subscriber.close()

        drive(recorder, rng, 100)  # nobody listening: the ring holds them all, or only the last 4
        wait_until(lambda: publisher.sent_seq == recorder.seq)
        subscriber = KvEventSubscriber(publisher.endpoint, publisher.replay_endpoint, blocks=blocks)
        drive(recorder, rng, 100, subscriber)
        follow(subscriber, recorder)
        assert subscriber.snapshots == (0 if buffer_steps > 300 else 1)
        assert snapshots == 1  # the first one joined by the snapshot
        subscriber.close()
    finally:
        publisher.close()


def test_a_subscriber_past_the_high_water_mark_sees_the_gap_and_heals() -> None:
    rng = random.Random(5)
    recorder, publisher = start(hwm=2)
    try:
        subscriber = KvEventSubscriber(publisher.endpoint, publisher.replay_endpoint, hwm=2)
        for _ in range(1000):  # ~30 MB of batches, unread: more than the sockets' and the kernel's buffers hold
            random_step(recorder, rng, {}, hashes=400, size=64)
        time.sleep(0.5)
        follow(subscriber, recorder)
        assert subscriber.gaps >= 1 and subscriber.snapshots == 1  # healed by the replay, not another snapshot
        subscriber.close()
    finally:
        publisher.close()


def test_the_frames_and_the_replay_protocol_are_vllms() -> None:
    recorder, publisher = start(topic="kv@node", buffer_steps=3)
    context = zmq.Context.instance()
    sub, dealer = context.socket(zmq.SUB), context.socket(zmq.DEALER)
    try:
        sub.connect(publisher.endpoint)
        sub.subscribe(b"kv@node")
        dealer.connect(publisher.replay_endpoint)
        recorder.stored([1], None, tokens(1), BLOCK, GPU)
        recorder.flush()
        while not sub.poll(50):  # a SUB hears only what is sent after it joined
            recorder.stored([2], None, tokens(1), BLOCK, GPU)
            recorder.removed([2], GPU)
            recorder.flush()
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"kv@node" and len(seq) == 8 and decode(payload).data_parallel_rank == 0
        for block in range(3, 8):  # more batches than the ring holds
            recorder.stored([block], None, tokens(1), BLOCK, GPU)
            recorder.flush()
        while int.from_bytes(seq, "big") != recorder.seq:  # heard: the ring has it too
            assert sub.poll(5000)
            _, seq, _ = sub.recv_multipart()

        def ask(start_seq: int) -> list[list[bytes]]:
            dealer.send_multipart((b"", start_seq.to_bytes(8, "big")))
            answer = []
            while not answer or answer[-1][2] != END_SEQ:
                assert dealer.poll(5000)
                answer.append(dealer.recv_multipart())
            return answer

        replayed = ask(0)
        assert replayed[-1] == [b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
        seqs = [int.from_bytes(frames[2], "big") for frames in replayed[:-1]]
        assert seqs == list(range(recorder.seq - 2, recorder.seq + 1))  # the ring's 3, in order
        (_, topic, snapshot_seq, snapshot), end = ask(SNAPSHOT_SEQ)
        assert int.from_bytes(snapshot_seq, "big") == recorder.seq and end[2] == END_SEQ
        assert decode(snapshot).events == [AllBlocksCleared(), *recorder.snapshot()[1].events[1:]]
    finally:
        sub.close(linger=0)
        dealer.close(linger=0)
        publisher.close()


def test_the_instance_index_offsets_ports_and_is_stamped() -> None:
    assert offset_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint("tcp://*:5557", 3) == "tcp://*:5560"
    assert offset_endpoint("tcp://127.0.0.1:0", 3) == "tcp://127.0.0.1:0"
    assert offset_endpoint("inproc://kv", 2) == "inproc://kv_dp2"
    config = parse_kv_events_config({"enable_kv_cache_events": True, "endpoint": "inproc://kv-rank"})
    publisher = ZmqKvEventPublisher(config, lambda: (0, KVEventBatch(ts=0.0, events=[])), data_parallel_rank=2)
    assert publisher.endpoint == "inproc://kv-rank_dp2"
    sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        sub.connect(publisher.endpoint)
        sub.subscribe(b"")
        for seq in range(1000):
            publisher.append((seq, KVEventBatch(ts=1.0, events=[])))
            if sub.poll(50):
                break
        assert decode(sub.recv_multipart()[2]).data_parallel_rank == 2
    finally:
        sub.close(linger=0)
        publisher.close()


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_defaults_are_vllms() -> None:
    assert parse_kv_events_config(None) == KvEventsConfig()
    assert parse_kv_events_config("{}").publisher == "null"
    on = parse_kv_events_config('{"enable_kv_cache_events": true}')
    assert (on.publisher, on.endpoint, on.replay_endpoint, on.buffer_steps, on.hwm, on.max_queue_size, on.topic) == (
        "zmq", "tcp://*:5557", None, 10_000, 100_000, 100_000, "",
    )  # fmt: skip
    assert on.publishes and not parse_kv_events_config({"enable_kv_cache_events": True, "publisher": "null"}).publishes


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"hwm": 0}', "kv_events_config.hwm"),
        ({"buffer_steps": "10"}, "kv_events_config.buffer_steps"),
        ({"max_queue_size": True}, "kv_events_config.max_queue_size"),
        ({"publisher": "kafka"}, "kv_events_config.publisher"),
        ({"enable_kv_cache_events": "yes"}, "kv_events_config.enable_kv_cache_events"),
        ({"endpoint": "localhost:5557"}, "kv_events_config.endpoint"),
        ({"replay_endpoint": 5558}, "kv_events_config.replay_endpoint"),
        ({"topic": None}, "kv_events_config.topic"),
        ({"endpont": "tcp://*:1"}, "kv_events_config.endpont"),
        ("{not json", "kv_events_config"),
        ("[1, 2]", "kv_events_config"),
    ],
)
def test_a_bad_config_names_its_key(raw: object, field: str) -> None:
    with pytest.raises(FieldError) as error:
        parse_kv_events_config(raw)
    assert error.value.field == field and field in str(error.value)


def test_a_taken_port_names_the_endpoint() -> None:
    _, publisher = start()
    try:
        taken = KvEventsConfig(True, "zmq", "tcp://127.0.0.1:0", replay_endpoint=publisher.replay_endpoint)
        with pytest.raises(FieldError, match="kv_events_config.replay_endpoint: cannot open"):
            ZmqKvEventPublisher(taken, lambda: (0, KVEventBatch(0.0, [])))
    finally:
        publisher.close()
