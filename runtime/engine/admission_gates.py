"""What a waiting request needs, besides a seat in the batch, its share of the step and its KV blocks, before the
scheduler starts it: a seat for its recurrent states, a slot for its LoRA adapter, its `n` group's prompt computed.

Every request waits in the scheduler's one line (`request_queue.py`); at each step the scheduler asks each gate of
each request in serving order whether it may start (`ready`, a question that changes nothing), passes over one that
may not (the ones behind it may start ahead of it, as vLLM v1 skips a request whose adapter finds no slot), tells the
gates when it starts (`started`), when a step has computed its prompt (`prompt_computed`) and when it stops running
(`stopped`: preempted, or finished). A gate holds what a request takes only while it runs, so a request waiting in the
line holds nothing another could use.

A guided request's grammar is compiled when the engine takes the request (`request_intake.py`, from a cache the
gateway's own check filled in-process), so no request waits on one here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sagellm.runtime.engine.lora_slots import LoraSlots
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.state_slots import StateSlots


class AdmissionGate(Protocol):
    def joined(self, seq: Sequence) -> None:
        """`seq` entered the waiting line (once: a preempted sequence goes back without joining again)."""

    def ready(self, seq: Sequence) -> bool:
        """Whether the waiting `seq` may start now, as far as this gate goes."""

    def started(self, seq: Sequence) -> None:
        """`seq` starts running (it was `ready` and got its blocks): it takes what it holds while it runs."""

    def prompt_computed(self, seq: Sequence) -> None:
        """A step computed the last token of the running `seq`'s prompt: its full blocks are in the prefix cache."""

    def stopped(self, seq: Sequence, finished: bool) -> None:
        """`seq` stopped running (preempted; `finished`: ended, which a waiting sequence may do too)."""


class StateSeats:
    """A model with recurrent layers keeps a running sequence's states in a slot of its own (`state_slots.py`), one
    per seat of the batch: the scheduler's seat check (which, under `priority`, preempts a lower sequence for a
    higher one) frees a slot whenever it frees a seat, so this gate never holds a sequence back by itself."""

    def __init__(self, slots: StateSlots) -> None:
        self._slots = slots

    def joined(self, seq: Sequence) -> None:
        pass

    def ready(self, seq: Sequence) -> bool:
        return True

    def started(self, seq: Sequence) -> None:
        self._slots.seat(seq)

    def prompt_computed(self, seq: Sequence) -> None:
        pass

    def stopped(self, seq: Sequence, finished: bool) -> None:
        self._slots.unseat(seq)
        seq.imported_states = None  # states a prefill worker sent: stale once it is recomputed


class LoraSlotGate:
    """A request with a LoRA adapter runs while its adapter is in one of the engine's `max_loras` slots
    (`lora_slots.py`): requests of adapters in the slots, and of none, start; one whose adapter would need a slot
    that every adapter in use holds waits until one is free."""

    def __init__(self, slots: LoraSlots) -> None:
        self._slots = slots

    def joined(self, seq: Sequence) -> None:
        pass

    def ready(self, seq: Sequence) -> bool:
        return seq.lora_adapter is None or self._slots.can_acquire(seq.lora_adapter)

    def started(self, seq: Sequence) -> None:
        if seq.lora_adapter is not None:
            slot = self._slots.acquire(seq.lora_adapter)
            assert slot is not None, "started without being ready"
            seq.lora_slot = slot

    def prompt_computed(self, seq: Sequence) -> None:
        pass

    def stopped(self, seq: Sequence, finished: bool) -> None:
        if seq.lora_slot >= 0:
            self._slots.release(seq.lora_slot)
            seq.lora_slot = -1


@dataclass(eq=False)
class _Group:
    members: int = 0  # in the line or running
    leader: Sequence | None = None  # the one computing the prompt the others will find cached
    prompt_cached: bool = False  # the leader's prompt was computed: its KV is in the prefix cache


class ChoiceGroups:
    """The `n` choices of one request share its prompt (`Sequence.group`): the first to start computes it, the
    others wait until its KV is in the prefix cache, then each computes only the prompt's last, partial block. A
    leader that ends before its prompt is computed hands the lead to the next one that starts."""

    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}

    def joined(self, seq: Sequence) -> None:
        if seq.group is not None:
            self._groups.setdefault(seq.group, _Group()).members += 1

    def ready(self, seq: Sequence) -> bool:
        group = self._groups.get(seq.group) if seq.group is not None else None
        if group is None or group.prompt_cached or group.leader is None or group.leader is seq:
            return True
        return group.leader.is_finished  # it ended without computing the prompt: whoever starts next leads

    def started(self, seq: Sequence) -> None:
        group = self._groups.get(seq.group) if seq.group is not None else None
        if group is not None and not group.prompt_cached and (group.leader is None or group.leader.is_finished):
            group.leader = seq
            if seq.num_computed_tokens >= seq.num_prompt_tokens:  # its prompt came computed (from a prefill worker)
                group.prompt_cached = True

    def prompt_computed(self, seq: Sequence) -> None:
        group = self._groups.get(seq.group) if seq.group is not None else None
        if group is not None and group.leader is seq:
            group.prompt_cached = True

    def stopped(self, seq: Sequence, finished: bool) -> None:
        group = self._groups.get(seq.group) if seq.group is not None else None
        if group is not None and finished:
            group.members -= 1
            if group.members == 0:
                del self._groups[seq.group]


def admission_gates(state_slots: StateSlots | None, lora: LoraSlots | None) -> list[AdmissionGate]:
    """The gates of an engine with these parts, the ones that hold the scarcest thing first."""
    gates: list[AdmissionGate] = [StateSeats(state_slots)] if state_slots is not None else []
    if lora is not None:
        gates.append(LoraSlotGate(lora))
    gates.append(ChoiceGroups())
    return gates
