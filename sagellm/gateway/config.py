"""What a gateway is started with: its address, keys, models and limits, and the defaults every front end shares
(`sagellm serve`, `sagellm gateway start`, the embedded client, the engine processes a gateway spawns)."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm import graphs
from sagellm.common.autoscale import AutoscaleSettings
from sagellm.common.errors import FieldError
from sagellm.common.home import gateway_dir

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
# The graph a gateway serves unless given one: one colocated engine (graphs/colocated.yaml, shipped in the package).
DEFAULT_GRAPH = graphs.DEFAULT
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # the largest request body read
API_KEY_ENV = "SAGELLM_API_KEY"
ADMIN_KEY_ENV = "SAGELLM_ADMIN_KEY"
JOIN_KEY_ENV = "SAGELLM_JOIN_KEY"  # the admin key of a gateway `sagellm serve --join` joins
# Disaggregated serving across servers (`openai/kv_transfer/peers.py` checks requests against these settings).
ROLES = ("producer", "consumer", "both")  # vLLM's kv_role: kv_producer, kv_consumer, kv_both
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")  # a DNS label (underscores too: container hosts' names)
# what each kv_transfer_params asks of this server -> the roles that do it
ASKS = {"do_remote_decode": ("producer", "both"), "do_remote_prefill": ("consumer", "both")}


def host_of(text: str) -> str | None:
    """`text` as a host a URL may name, or None: an IP address (canonical; an IPv6 one bare or in brackets, without a
    zone) or an ASCII DNS name (lower case, no trailing dot, its last label not a number: `127.1` reads as an
    address)."""
    if not text.isascii():
        return None
    bracketed = text.startswith("[") and text.endswith("]")
    try:
        address = ipaddress.ip_address(text[1:-1] if bracketed else text)
    except ValueError:
        address = None
    if address is not None:
        zoned = isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None
        return None if zoned or (bracketed and address.version != 6) else str(address)
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    if not 0 < len(name) <= 253 or labels[-1].isdigit() or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return name


def peer_address(text: str) -> tuple[str, int]:
    """A listed prefill server, `HOST:PORT` (`[ADDRESS]:PORT` for IPv6), as its host (`host_of`) and port."""
    host, colon, port = text.strip().rpartition(":")
    name = host_of(host) if colon and not (":" in host and not host.startswith("[")) else None
    if name is None or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        message = f"--kv-transfer-peers: a prefill server is HOST:PORT ([ADDRESS]:PORT for IPv6), got {text!r}"
        raise FieldError("kv_transfer.peers", message)
    return name, int(port)


@dataclass(frozen=True)
class KVTransferSettings:
    """The part this server plays in disaggregated serving across servers (`GatewayConfig.kv_transfer`): `role`
    producer prefills for decode servers elsewhere (`do_remote_decode`), consumer decodes from the prefill servers
    `peers` lists (`do_remote_prefill`), both does either."""

    role: str
    peers: tuple[str, ...] = ()  # HOST:PORT of each prefill server a consumer may fetch KV from

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise FieldError("kv_transfer.role", f"--kv-transfer-role: producer, consumer or both, got {self.role!r}")
        for peer in self.peers:
            peer_address(peer)
        if self.consumes and not self.peers:
            message = (f"--kv-transfer-role {self.role} fetches KV from the prefill servers --kv-transfer-peers "
                       "lists: give at least one HOST:PORT")  # fmt: skip
            raise FieldError("kv_transfer.peers", message)
        if self.peers and not self.consumes:
            message = ("--kv-transfer-peers lists the prefill servers a consumer fetches KV from; a producer fetches "
                       "none (--kv-transfer-role consumer or both)")  # fmt: skip
            raise FieldError("kv_transfer.peers", message)

    @property
    def consumes(self) -> bool:
        return self.role in ASKS["do_remote_prefill"]


@dataclass(frozen=True)
class FailoverPolicy:
    """When a request whose attempt failed is tried again (sagellm.gateway.serving.request_stream)."""

    max_retries: int = 2  # attempts after the first
    retry_wait_s: float = 60.0  # how long a retry waits for a healthy instance (a lost worker restarts in ~15 s)
    first_token_timeout_s: float = 300.0  # queueing included: a loaded CPU server can take minutes
    token_timeout_s: float = 60.0  # between two tokens
    # Most seconds a request waits for an engine (in the policy queue, no item yet) before it ends with a 503 that
    # is not retried here; None: as long as first_token_timeout_s allows.
    queue_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise FieldError("max_retries", f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("retry_wait_s", "first_token_timeout_s", "token_timeout_s"):
            if not getattr(self, name) > 0:
                raise FieldError(name, f"{name} must be > 0, got {getattr(self, name)}")
        if self.queue_timeout_s is not None and not self.queue_timeout_s > 0:
            raise FieldError("queue_timeout_s", f"queue_timeout_s must be > 0 or unset, got {self.queue_timeout_s}")


@dataclass(frozen=True)
class JoinSettings:
    """Another gateway this one joins as one of its instances (`sagellm serve --join`; sagellm.gateway.control.join)."""

    gateway: str  # the head's base URL
    model: str  # the name this server serves (the head's own model name: a replica of it)
    url: str | None = None  # where the head reaches this server (default: the address it listens on)
    admin_key: str | None = None  # the head's admin key
    api_key: str | None = None  # a key this server accepts, for the head's calls
    label: str | None = None
    recheck_s: float = 10.0
    drain_timeout_s: float = 120.0  # how long leaving waits for the head to drain this server


@dataclass(frozen=True)
class ModelsOnDemand:
    """Models a gateway loads when a request names them (`sagellm serve --model NAME=MODEL ...`,
    sagellm.gateway.control.model_pool)."""

    # the name clients send -> the model (path, .gguf, alias or org/name), or the engine it is (a preset's engine:
    # `control.engine_spec.EngineSpec`'s fields, its kind llm or another project's server started here)
    models: dict[str, str | dict[str, Any]]
    # every model's engine settings (EngineConfig's fields; a preset's llm engine's own settings take precedence)
    engine: dict[str, Any] = field(default_factory=dict)
    max_loaded: int | None = None  # models loaded at once (None: as many as memory allows)
    idle_unload_s: float | None = None  # a model idle this long is unloaded (None: only to make room)
    # each loaded model's replicas scaled so (`common.autoscale.AutoscaleSettings`' fields); None: one engine each
    autoscale: dict[str, Any] | None = None

    def check(self) -> None:
        if not self.models:
            raise FieldError("models", "models on demand need at least one NAME=MODEL")
        for name, model in self.models.items():
            source = model if isinstance(model, str) else model.get("model", "")
            if not name.strip() or not source.strip():
                raise FieldError("models", f"a model on demand is NAME=MODEL, both non-empty; got {name}={source}")
        if self.max_loaded is not None and self.max_loaded < 1:
            raise FieldError("max_loaded", f"--max-loaded-models must be >= 1, got {self.max_loaded}")
        if self.idle_unload_s is not None and not self.idle_unload_s > 0:
            raise FieldError("idle_unload_s", f"--idle-unload-s must be > 0, got {self.idle_unload_s}")
        if self.autoscale is not None:
            AutoscaleSettings.from_settings(self.autoscale)


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (tests)
    api_keys: list[str] = field(default_factory=list)
    api_keys_file: Path | None = None  # keys with names and policies (gateway/keys/keys_file.py)
    otlp_traces_endpoint: str | None = None  # where request traces go (OTLP/HTTP; sagellm/common/tracing.py)
    access_log: Path | None = None  # a JSON line a request (serving/access_log.py), rotated at access_log_max_mb
    access_log_max_mb: float = 100.0
    per_request_metrics: bool = False  # vLLM's --enable-per-request-metrics: a reply's `metrics` beside its usage
    admin_key: str | None = None
    embedding_model: str | None = None
    pooling_models: list[str] = field(default_factory=list)  # rerankers, classifiers, more embedding models
    served_model_name: str | None = None
    model_aliases: list[str] = field(default_factory=list)  # more names clients may use for it (vLLM's extra names)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_connections: int | None = None  # open connections served at once (None: from the fd limit; HttpLimits)
    tool_call_parser: str | None = None  # vLLM's --tool-call-parser (None: chosen from the model's chat template)
    reasoning_parser: str | None = None  # vLLM's --reasoning-parser (None: chosen from the model's chat template)
    reasoning_budget: int | None = None  # llama.cpp's --reasoning-budget: thinking tokens of a request that sets none
    # vLLM's --allowed-media-domains and --allowed-local-media-path: where a chat's image_url parts may be fetched
    # from (hosts of http(s) URLs; a directory for local files); none by default (gateway/media/policy.py)
    allowed_media_domains: list[str] = field(default_factory=list)
    allowed_local_media_path: str | None = None
    state_dir: Path = field(default_factory=gateway_dir)
    graceful_timeout_s: float = 30.0
    # Host names requests may address the gateway by (Host, a browser's Origin). None: loopback names when bound to
    # loopback (a page cannot rebind a name to 127.0.0.1 and drive the gateway), any when bound elsewhere.
    allowed_hosts: list[str] | None = None
    failover: FailoverPolicy = field(default_factory=FailoverPolicy)
    join: JoinSettings | None = None  # another gateway this one joins as an instance (sagellm.gateway.control.join)
    # HOST:PORT (port 0: any) where API servers on other hosts attach (`sagellm api-server --core`); None: only the
    # gateway's own (`--api-servers`, over ipc). The link is CURVE-encrypted with a key made for the run.
    api_hub: str | None = None
    # How the admin and management routes are guarded: "key" (the admin key), or "loopback" (no key, for tools that
    # send none, such as the control-plane benchmark: only on a gateway bound to loopback, with no API hub, so every
    # caller is a process on this machine; browsers' cross-site requests stay refused by the Host/Origin check). The
    # routes that start a process, read a path or add an upstream (engines, model and LoRA loads) need the key always.
    admin_auth: str = "key"
    # Where an `openai` engine registered over the management API may be, servers joining with --join included:
    # HOST[:PORT], HOST a name, an address or a network (`control.upstreams`); empty: nowhere.
    allowed_upstreams: list[str] = field(default_factory=list)
    models_on_demand: ModelsOnDemand | None = None  # models loaded when requests name them, besides the graph's
    lora_modules: dict[str, str] = field(default_factory=dict)  # LoRA adapters: name -> path
    # the model on demand an adapter of `lora_modules` adapts, by its name (an adapter not here: the graph's model's)
    lora_bases: dict[str, str] = field(default_factory=dict)
    # this server's part in disaggregated serving across servers (vLLM's kv_transfer_params: `--kv-transfer-role`,
    # the prefill servers it fetches KV from `--kv-transfer-peers`); None: none, the field is refused
    kv_transfer: KVTransferSettings | None = None

    def host_names(self) -> frozenset[str] | None:
        if self.allowed_hosts is not None:
            return frozenset(h.lower() for h in self.allowed_hosts)
        return LOOPBACK_NAMES if self.host in LOOPBACK_NAMES else None

    def admin_auth_problem(self) -> str | None:
        """What makes `admin_auth` unusable here, if anything."""
        if self.admin_auth not in ("key", "loopback"):
            return f"admin_auth: key or loopback, got {self.admin_auth!r}"
        if self.admin_auth == "loopback" and self.host not in LOOPBACK_NAMES:
            return f"admin_auth loopback needs a gateway bound to loopback (127.0.0.1), not {self.host}"
        if self.admin_auth == "loopback" and self.api_hub is not None:
            return "admin_auth loopback and an API hub: API servers on other hosts would pass on keyless admin calls"
        return None

    @classmethod
    def from_env(cls, **overrides: Any) -> GatewayConfig:
        """Keys from the environment unless given: SAGELLM_API_KEY (comma-separated) and SAGELLM_ADMIN_KEY."""
        keys = [k for k in os.environ.get(API_KEY_ENV, "").split(",") if k]
        config = cls(api_keys=keys, admin_key=os.environ.get(ADMIN_KEY_ENV) or None)
        for name, value in overrides.items():
            if value is not None:
                setattr(config, name, value)
        return config
