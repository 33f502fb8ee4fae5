"""The requests the engine holds before its scheduler sees them: those whose LoRA adapter waits for a free slot, and
the choices of an `n` group parked until the group's first request has computed the prompt they share.

Two waiting lines beside the scheduler's own queue, kept together in one place so each step admits from both
(`admit`) and an abort or the engine's load finds every request that waits."""

from __future__ import annotations

from sagellm.runtime.engine.lora_slots import LoraSlots
from sagellm.runtime.engine.scheduler import Scheduler
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.models.lora_adapter import LoraAdapter


class WaitingLines:
    def __init__(self, scheduler: Scheduler, lora: LoraSlots | None) -> None:
        self._scheduler, self._lora = scheduler, lora
        # Requests whose LoRA adapter waits for a free slot, in arrival order, each with its group (`add`).
        self._lora_waiting: list[tuple[Sequence, LoraAdapter, str | None]] = []
        # A request's choices share its prompt (`add`'s group): the first prefills it, the others wait here until its
        # KV is in the prefix cache, then each computes only the prompt's last, partial block.
        self._group_leaders: dict[str, Sequence] = {}
        self._parked: dict[str, list[Sequence]] = {}

    def add(self, seq: Sequence, adapter: LoraAdapter | None, group: str | None) -> None:
        """Into the scheduler, or held until its adapter has a slot or its group's prompt is computed."""
        if adapter is not None and not self.take_lora_slot(seq, adapter):
            self._lora_waiting.append((seq, adapter, group))
            return
        self._enqueue(seq, group)

    def add_prefilled(self, seq: Sequence, adapter: LoraAdapter | None, waits: bool) -> None:
        """A request whose prompt KV another engine computed: into the scheduler, or, when its adapter found no slot
        (`waits`: `take_lora_slot` said so), held with its KV in its blocks until the adapter has one."""
        if waits:
            self._lora_waiting.append((seq, adapter, None))
        else:
            self._scheduler.add(seq)

    def take_lora_slot(self, seq: Sequence, adapter: LoraAdapter) -> bool:
        assert self._lora is not None
        slot = self._lora.acquire(adapter)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def admit(self) -> None:
        """Queues what may run now: the parked choices whose group's prompt is computed, then, in arrival order, the
        requests whose adapter has a slot (one that finds none keeps the rest waiting behind it)."""
        self.release_parked()
        while self._lora_waiting:
            seq, adapter, group = self._lora_waiting[0]
            if not self.take_lora_slot(seq, adapter):
                return
            self._lora_waiting.pop(0)
            if seq.num_computed_tokens:  # prefilled elsewhere: decodes from its imported KV
                self._scheduler.add(seq)
            else:
                self._enqueue(seq, group)

    def release_parked(self) -> None:
        """Queues the requests that waited for their group's prompt, once it is computed (or its first request
        ended without computing it: the next one then leads)."""
        for group, leader in list(self._group_leaders.items()):
            if _prompt_computed(leader):
                del self._group_leaders[group]
                parked = self._parked.pop(group, [])
                if parked and leader.num_computed_tokens < leader.num_prompt_tokens:  # ended first: the next leads
                    self._group_leaders[group] = parked[0]
                    self._parked[group] = parked[1:]
                    parked = parked[:1]
                for seq in parked:
                    self._scheduler.add(seq)

    def remove(self, seq: Sequence) -> None:
        """An aborted request leaves whichever line holds it."""
        for parked in self._parked.values():
            if seq in parked:
                parked.remove(seq)
        self._lora_waiting = [w for w in self._lora_waiting if w[0] is not seq]

    def parked(self) -> list[Sequence]:
        return [seq for group in self._parked.values() for seq in group]

    def __bool__(self) -> bool:
        """Whether any request waits here."""
        return any(self._parked.values()) or bool(self._lora_waiting)

    def _enqueue(self, seq: Sequence, group: str | None) -> None:
        """Into the scheduler, or parked until its group's prompt is computed."""
        leader = self._group_leaders.get(group) if group is not None else None
        if leader is not None and not _prompt_computed(leader):
            self._parked.setdefault(group, []).append(seq)
            return
        if group is not None:
            self._group_leaders[group] = seq
        self._scheduler.add(seq)


def _prompt_computed(seq: Sequence) -> bool:
    """Whether `seq`'s prompt KV is computed (so cached for requests sharing it), or never will be by it."""
    return seq.is_finished or seq.num_computed_tokens >= seq.num_prompt_tokens
