"""vLLM's tokenizer endpoints: `POST /tokenize` (a prompt, or chat messages as the server renders them),
`POST /detokenize`, `GET /tokenizer_info` and `GET /version`, in vLLM's request and response shapes.

Clients count and check prompts with them before they send one, and lm-evaluation-harness's `local-completions`
reads the server's tokenizer through them (its default `tokenizer_backend=auto` asks `/tokenizer_info` for the
`eos_token`, then `/tokenize`). A chat is tokenized as a chat request is served (`tokenize_request`: the model's chat
template, its tools), so `count` is the request's `prompt_tokens`; `add_special_tokens` set by the client encodes
the text that way instead; a chat's images and audio are counted as the engine expands them (`media_tokens`). They
serve the graph's own model, and another model whose engines are ours (the gateway holds its files); a model another
server serves is that server's to tokenize."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import msgspec
import trio

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.media import MediaPolicy
from sagellm.gateway.media.by_uuid import MediaByUuid
from sagellm.gateway.openai.chat_completion.protocol import template_kwargs, template_messages
from sagellm.gateway.openai.tokenization.media_tokens import with_media_expanded
from sagellm.gateway.openai.tokenization.protocol import DetokenizeRequest, TokenizeRequest
from sagellm.gateway.replies.chat_templates import fallback_template, rendering_template
from sagellm.gateway.replies.tools import plan
from sagellm.gateway.serving.core import ServingCore
from sagellm.gateway.serving.prompts import OFF_LOOP_CHARS
from sagellm.operators.admission import tokenize_request
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.served_model import ServedModel

# What /tokenizer_info leaves out of the tokenizer's settings: file paths of this machine.
_FILE_KEYS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")


class TokenizerRoutes:
    def __init__(self, core: ServingCore, media: MediaPolicy | None = None, kept: MediaByUuid | None = None) -> None:
        """`media`: where a chat's images may be fetched from, `kept`: the files senders named by uuid (the chats'
        own; None: data URLs only, no names)."""
        self.core = core
        self.media = media or MediaPolicy()
        self.kept = kept or MediaByUuid()

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("POST", "/tokenize", self.tokenize, guard)
        app.route("POST", "/detokenize", self.detokenize, guard)
        app.route("GET", "/tokenizer_info", self.tokenizer_info, guard)
        app.route("GET", "/version", self.version, guard)

    async def tokenize(self, http: HttpRequest) -> Response:
        body = http.json(TokenizeRequest)
        tokens, served = await self.tokens(body, key_owner(http))
        reply: dict[str, Any] = {"count": len(tokens), "max_model_len": served.max_model_len, "tokens": tokens}
        reply["token_strs"] = served.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return Response(reply)

    async def tokens(self, body: TokenizeRequest, owner: str) -> tuple[list[int], ServedModel]:
        """The tokens a prompt or a chat would be charged as served, and the model whose tokenizer counted them (for
        `/tokenize` and the Messages API's `count_tokens`); `owner`: who asks (the media it named by uuid)."""
        served = await self._served(body.model)
        tokenizer = served.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give one of prompt or messages", param="prompt")

        def encode() -> list[int]:
            text = self._render(body, served) if body.messages is not None else body.prompt or ""
            if body.add_special_tokens is not None:
                return tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
            request = Request(request_id="tokenize", prompt=text)  # as a request is tokenized when it is served
            tokenize_request(request, tokenizer, None)
            return request.prompt_token_ids or []

        # a long text or chat is rendered and encoded in a thread, never on the event loop every stream shares
        work = len(body.prompt or "") + len(msgspec.json.encode(body.messages)) + len(msgspec.json.encode(body.tools))
        ids = encode() if work <= OFF_LOOP_CHARS else await trio.to_thread.run_sync(encode)
        if body.messages is not None:
            name = body.model or self.core.model_name
            ids = await with_media_expanded(ids, body, served, name, self.media, self.kept, owner)
        return ids, served

    async def detokenize(self, http: HttpRequest) -> Response:
        body = http.json(DetokenizeRequest)
        served = await self._served(body.model)
        vocab, tokens = served.vocab_size, body.tokens

        def decode() -> str:
            beyond = next((t for t in tokens if vocab is not None and t >= vocab), None)
            if beyond is not None:
                raise ApiError(400, f"tokens: {beyond} is outside the vocabulary of {vocab}", param="tokens")
            return served.tokenizer.decode(tokens)

        text = decode() if len(tokens) <= OFF_LOOP_CHARS else await trio.to_thread.run_sync(decode)  # as encode
        return Response({"prompt": text})

    async def tokenizer_info(self, http: HttpRequest) -> Response:
        served = await self._served(http.query.get("model"))
        tokenizer = served.tokenizer
        info = {key: _plain(value) for key, value in tokenizer.init_kwargs.items() if key not in _FILE_KEYS}
        info["tokenizer_class"] = type(tokenizer).__name__
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            info[name] = _plain(getattr(tokenizer, name, None))
        info["chat_template"] = getattr(tokenizer, "chat_template", None)
        info["model_max_length"] = served.max_model_len
        return Response(info)

    async def version(self, _: HttpRequest) -> Response:
        return Response({"version": version("sagellm")})

    async def _served(self, name: str | None) -> ServedModel:
        """The front-end files of the model a request names: the graph's, or another whose engines are ours (one
        loaded on demand is loaded first)."""
        model = self.core.instance_model(name)
        await self.core.readiness.model_ready(model, submits=False)
        served = self.core.served if model is None else self.core.registry.files_of(model)
        if served is None or served.tokenizer is None:
            where = "the server that serves it tokenizes" if model is not None else "the model has no tokenizer here"
            raise ApiError(400, f"model: no tokenizer for {name or self.core.model_name} ({where})", param="model")
        return served

    @staticmethod
    def _render(body: TokenizeRequest, served: ServedModel) -> str:
        tokenizer = served.tokenizer
        settings = template_kwargs(body.add_generation_prompt, body.continue_final_message)
        messages = template_messages(body.messages or [])
        template = rendering_template(tokenizer, served.config)
        tools = plan(body.tools, None, True, template) if body.tools else None  # the template a served chat gets
        chosen = (tools.chat_template if tools else None) or fallback_template(tokenizer, served.config)
        try:
            return tokenizer.apply_chat_template(
                messages, tools=tools.tools if tools else None, chat_template=chosen,
                tokenize=False, **({"add_generation_prompt": True} | (settings or {})),
            )  # fmt: skip
        except Exception as exc:  # a template error names what is wrong with the messages
            raise ApiError(400, f"messages cannot be rendered with the model's chat template: {exc}",
                           param="messages") from None  # fmt: skip


def _plain(value: Any) -> Any:
    """A tokenizer setting as JSON: a special token object as its text (`AddedToken.content`)."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)
