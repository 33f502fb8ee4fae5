"""The OpenAI API's endpoints that run requests, built over one serving core (`ServingApi`: the gateway's, or an API
server's remote one) and registered in the order their routes are listed (`/openapi.json` follows it):
`/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`, then the pooling routes (rerank, score, classify).
Built once, so the endpoints share what is one per server (the KV hand-off across servers, the chat's preparation),
and the APIs that run chats take the narrow piece they use: `preparation` for the Responses and Messages APIs,
`chat` for sessions. The gateway's process registers `/v1/models` before them and `/v1/requests/{id}` after them
(`ModelsRoutes`, `RequestStatusRoutes`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.indexes.store import IndexStore
from sagellm.gateway.media import MediaPolicy
from sagellm.gateway.openai.chat_completion.api_router import ChatRoutes
from sagellm.gateway.openai.chat_completion.preparation import ChatPreparation
from sagellm.gateway.openai.chat_completion.serving import ChatServing
from sagellm.gateway.openai.completion.api_router import CompletionRoutes
from sagellm.gateway.openai.embedding.api_router import EmbeddingRoutes
from sagellm.gateway.openai.kv_transfer.serving import KVHandOff
from sagellm.gateway.openai.pooling.api_router import PoolingRoutes
from sagellm.gateway.serving.interface import ServingApi


class OpenAIApi:
    def __init__(
        self,
        core: ServingApi,
        indexes: IndexStore | None = None,
        to_core: Callable[[HttpRequest], Awaitable[Response]] | None = None,
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
        reasoning_budget: int | None = None,
        hand_off: KVHandOff | None = None,
        media: MediaPolicy | None = None,
        per_request_metrics: bool = False,
    ) -> None:
        """`indexes`: the retrieval indexes chats may name (`"index"`); None in an API server's process, which
        passes such chats on to the gateway's core, that holds them (`to_core`). `tool_call_parser`: how tool calls
        are read from replies, `reasoning_parser` how thinking is (None: each chosen from the model's template);
        `reasoning_budget`: the thinking tokens of a request that sets no budget of its own (None: no bound);
        `hand_off`: this server's part in disaggregated serving across servers (None: none, `kv_transfer_params`
        refused; an API server's, whose core keeps no KV for other servers); `media`: where a chat's images may be
        fetched from (None: data URLs only); `per_request_metrics`: replies carry vLLM's per-request `metrics`
        (`--enable-per-request-metrics`)."""
        hand_off = hand_off or KVHandOff()
        self.preparation = ChatPreparation(
            core, hand_off, indexes, tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser,
            reasoning_budget=reasoning_budget, media=media, per_request_metrics=per_request_metrics,
        )  # fmt: skip
        self.chat = ChatServing(self.preparation)
        self.completions = CompletionRoutes(core, hand_off, per_request_metrics)
        self._chats = ChatRoutes(self.chat, to_core)
        self.embeddings = EmbeddingRoutes(core)
        self._pooling = PoolingRoutes(self.embeddings)

    def register(self, app: App, guard: Guard | None) -> None:
        """The routes that run requests: all an API server answers itself (`api_servers`)."""
        self.completions.register(app, guard)
        self._chats.register(app, guard)
        self.embeddings.register(app, guard)
        self._pooling.register(app, guard)
