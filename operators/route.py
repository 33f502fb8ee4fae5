"""The `route` operator: sends each request to one engine instance downstream, chosen by a routing strategy.

Candidates are the instances served by the node's outputs (engine nodes, and the instances that came at run time
through a stream node such as `remote_engine`) that serve the request's model, are healthy, and are of a role that
runs the request's phase: a "prefill" request needs a prefill worker; a "colocated" one runs on a colocated engine or
on a decode worker (a full engine that also prefills). A request already pinned to a candidate (`request.instance`,
set by a policy) keeps it; one retried after a failure avoids the instances that failed it (`request.exclude`) while
any other can take it. The request goes to the node that serves the chosen instance, named in `request.instance`.

After choosing, route charges the instance's `InstanceStats` at once (uncached prompt tokens, expected output tokens,
one more running request), so a burst routed before the engine reports back is still spread by the strategies that
read load; the engine operator overwrites these numbers with its own accounting. The prompt is recorded in the
`PrefixIndex` of what each instance has cached, which cache_aware reads and which gives the uncached-token charge;
its blocks are hashed under the request's salt and LoRA adapter's digest (`prefix_salt`), as the engine hashes them.
The choices of one request (`request.group`) go where the first went, while it can take them: that engine prefills
their prompt once. A request to prefill on an attached server (vLLM's disaggregated serving across servers) also
gets the server that decodes it (`request.decode_instance`); one another server prefilled (`request.prefilled`) goes
to an engine of the graph, the only kind its KV can go into. Where the engines' KV events say another instance holds
more of the prompt than the chosen one, the request names it (`request.peer_prefix`): the chosen engine fetches the
blocks from there."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

from sagellm.common.errors import FieldError
from sagellm.operators.kv_event_index import EventIndex
from sagellm.operators.prefix_index import PrefixIndex
from sagellm.operators.routing import make_strategy
from sagellm.runtime.engine.prefix_hash import effective_salt
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import Emit, InstanceStats, MapOperator, OperatorError, register_operator

# Roles of the instances that can take a request, by its phase.
ROLES_FOR_PHASE: dict[str, frozenset[str]] = {
    "prefill": frozenset({"prefill"}),
    "colocated": frozenset({"colocated", "decode"}),
    "decode": frozenset({"decode"}),
    "embed": frozenset({"embedding"}),
}
GROUPS_REMEMBERED = 4096  # the latest groups' instances: a group's choices arrive together, so a few suffice


@register_operator
class Route(MapOperator):
    name = "route"
    accepts = (Request,)
    multi_output = True
    parameter_help: ClassVar[dict[str, str]] = {
        "strategy": "routing strategy: load_balanced, round_robin, random, affinity, locality or cache_aware",
        "seed": "seed of the random strategy",
        "block_size": "tokens per block of the prefix index the cache-aware strategies read (the engines' block_size)",
        "kv_events": "read which prefixes an engine holds from its KV events where it publishes them (else estimate)",
    }

    def __init__(
        self, strategy: str = "load_balanced", seed: int | None = None, block_size: int = 16, kv_events: bool = True
    ) -> None:
        self.prefix_index = EventIndex(block_size=block_size) if kv_events else PrefixIndex(block_size=block_size)
        self._group_instance: OrderedDict[str, str] = OrderedDict()  # group -> the instance its first choice got
        try:
            self.strategy = make_strategy(strategy, prefix_index=self.prefix_index, seed=seed)
        except OperatorError as error:
            raise FieldError("strategy", str(error)) from None

    def execute(self, item: Request) -> Emit | RequestError:
        engines = [s for s in self.ctx.instances_among(self.ctx.outputs) if s.model == item.model]
        roles = ROLES_FOR_PHASE[item.phase]
        fitting = [s for s in engines if s.role in roles]
        candidates = [s for s in fitting if s.healthy]
        if item.sampling.asks_logprobs:  # servers reached over HTTP do not relay them: the graph's engines do
            candidates = [s for s in candidates if s.node is None] or candidates
        if item.prefilled is not None:  # its KV goes into an engine of the graph, never to a server
            candidates = [s for s in candidates if s.node is None]
        if not candidates:
            return self._no_candidate(item, engines, fitting)
        if isinstance(self.prefix_index, EventIndex):
            self.prefix_index.follow(candidates)
        tokens = item.prompt_token_ids or []
        hashes = self.prefix_index.hashes(tokens, prefix_salt(item))
        pinned = item.instance
        if pinned is None and item.group is not None:
            first = self._group_instance.get(item.group)
            pinned = first if first not in item.exclude else None
        chosen = next((c for c in candidates if c.name == pinned), None)
        if chosen is None:
            untried = [c for c in candidates if c.name not in item.exclude] or candidates
            chosen = self.strategy.choose(item, untried, hashes)
        if isinstance(self.prefix_index, EventIndex):  # before the charge records the prompt as the chosen's
            item.peer_prefix = self.prefix_index.peer_prefix(chosen, engines, hashes)
        self._charge(item, chosen, tokens, hashes)
        item.instance = chosen.name
        if item.phase == "prefill" and chosen.node is not None:
            decoder = self._decode_server(item, engines, chosen, hashes)
            if decoder is None:
                message = f"no healthy decode server of {item.model!r} beside {chosen.name}; retry later"
                return RequestError(request_id=item.request_id, code="unavailable", message=message, retryable=True)
            item.decode_instance = decoder.name
        if item.group is not None:
            self._group_instance[item.group] = chosen.name
            self._group_instance.move_to_end(item.group)
            if len(self._group_instance) > GROUPS_REMEMBERED:
                self._group_instance.popitem(last=False)
        return Emit(to=chosen.target, item=item)

    def close(self) -> None:
        if isinstance(self.prefix_index, EventIndex):
            self.prefix_index.close()

    def _decode_server(
        self, request: Request, engines: Sequence[InstanceStats], prefill: InstanceStats, hashes: list[int]
    ) -> InstanceStats | None:
        """A prefill on an attached server continues on a decode server of the same node (`remote_engine` links the
        two), chosen by the same strategy and counted on it as a request to decode."""
        decoders = [s for s in engines if s.role == "decode" and s.healthy and s.node == prefill.node]
        if not decoders:
            return None
        decoder = self.strategy.choose(
            request, [d for d in decoders if d.name not in request.exclude] or decoders, hashes
        )
        decoder.queued_decode_tokens += request.sampling.expected_output_tokens
        decoder.running += 1
        return decoder

    def _charge(self, request: Request, instance: InstanceStats, tokens: list[int], hashes: list[int]) -> None:
        """Count the request on the instance now, and remember its prompt as cached there."""
        cached = self.prefix_index.cached_tokens(instance.name, tokens, hashes)
        self.prefix_index.record(instance.name, tokens, hashes)
        instance.queued_prefill_tokens += len(tokens) - cached
        if request.phase not in ("prefill", "embed"):  # a prefill worker hands decoding on; an embedding has none
            instance.queued_decode_tokens += request.sampling.expected_output_tokens
        instance.running += 1

    def _no_candidate(
        self, request: Request, engines: Sequence[InstanceStats], fitting: Sequence[InstanceStats]
    ) -> RequestError:
        """Instances of the right role that are all unhealthy may recover: unavailable, retryable. No instance of the
        right role downstream at all is a graph that cannot serve this phase: internal, not worth retrying."""
        roles = " or ".join(sorted(ROLES_FOR_PHASE[request.phase]))
        if request.model is not None and not engines:  # its last instance left after the gateway looked
            return RequestError(
                request_id=request.request_id,
                code="unavailable",
                message=f"no instance serves the model {request.model!r} any more",
            )
        if fitting:
            wanted = f"instance of {request.model!r}" if request.model is not None else f"{roles} instance"
            why = "; ".join(f"{s.name} is {s.problem or s.state}" for s in fitting)
            return RequestError(
                request_id=request.request_id,
                code="unavailable",
                message=f"no healthy {wanted} for a {request.phase} request ({why}); retry later",
                retryable=True,
            )
        have = ", ".join(f"{s.name} ({s.role})" for s in engines) or "none"
        return RequestError(
            request_id=request.request_id,
            code="internal",
            message=f"route {self.ctx.node_id!r} has no {roles} instance downstream for a {request.phase} request; "
            f"engines downstream: {have}",
        )


def prefix_salt(request: Request) -> str | None:
    """The salt the engine hashes `request`'s prompt blocks under: its cache salt and its LoRA adapter, by the
    digest the gateway computed when it added the adapter (by name where the request carries none, which matches
    other such requests in the index though not the engine's blocks)."""
    lora = request.lora
    if lora is None:
        return effective_salt(request.cache_salt, None, None)
    return effective_salt(request.cache_salt, lora.lora_name, lora.lora_digest)
