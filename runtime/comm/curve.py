"""Authenticated encryption of a run's ZeroMQ links (CURVE + ZAP), for graphs whose sockets listen on a network.

One keypair per run, made by the process that runs the graph and shared by every process of the run: each process is
a server (its bound PULL, the parent's control ROUTER) and a client (its PUSHes, a worker's DEALER), and uses the same
keys in both roles. A server holds the run's secret key; a client proves it holds it too, because every process that
binds runs a ZAP handler that admits only clients presenting the run's public key. A client with another key, or with
none (plaintext), fails the handshake and never gets a message delivered. The server's public key never crosses the
wire, so without the key a stranger cannot even complete a handshake; the ZAP check is what makes holding the key,
not just knowing the public half, the condition.

The key travels as the Z85 text of the secret key (the public key derives from it, so the two cannot disagree): to the
workers the parent spawns in their environment (`SAGELLM_RUN_KEY`; never on the command line, which every user of
the host can read in /proc), to workers started by hand in a file readable by its owner only, which the user copies
to the worker's host over a secure channel (`--key-file`).

    keys = RunKeys.generate()
    with authenticator(ctx, keys):                                # before any socket binds, stopped before ctx.term()
        pull, endpoint = bind_pull(ctx, "tcp", "decode", keys=keys)   # zmq_trio applies `serve` / `join`"""

from __future__ import annotations

import contextlib
import hmac
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from sagellm.common.errors import InvalidInput
from sagellm.common.private_files import read_private, write_private

RUN_KEY_ENV = "SAGELLM_RUN_KEY"  # the run's key (Z85 secret key) for the workers the parent spawns
_Z85_KEY_LEN = 40


class RunKeyError(InvalidInput):
    """A run key that cannot be used: unreadable, or not a CURVE secret key (the message says where it came from)."""


@dataclass(frozen=True, repr=False)  # no repr: a logged or printed object must not show the secret
class RunKeys:
    """The run's CURVE keypair, both halves Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> RunKeys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def from_text(cls, text: str, where: str) -> RunKeys:
        """The keys of a Z85 secret key as `text()` wrote it (surrounding whitespace ignored); `where` names the
        source for the error."""
        secret = text.strip().encode("ascii", errors="replace")
        if len(secret) != _Z85_KEY_LEN:
            raise RunKeyError(f"{where}: expected the run's key ({_Z85_KEY_LEN} characters), got {len(secret)}")
        try:
            return cls(zmq.curve_public(secret), secret)
        except (zmq.ZMQError, ValueError):
            raise RunKeyError(f"{where}: not a run key (a Z85-encoded CURVE secret key)") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RunKeys | None:
        """The keys the parent handed this process in `SAGELLM_RUN_KEY`, if any."""
        text = environ.get(RUN_KEY_ENV)
        return cls.from_text(text, RUN_KEY_ENV) if text else None

    @classmethod
    def read(cls, path: Path) -> RunKeys:
        """The keys in a key file `write` made; refused (`OpenFileError`) if others may read or write it."""
        try:
            data = read_private(path)
        except (FileNotFoundError, IsADirectoryError) as error:
            raise RunKeyError(f"key file {path}: {error.strerror}") from None
        return cls.from_text(data.decode("ascii", errors="replace"), f"key file {path}")

    def text(self) -> str:
        """The secret key as text: what the environment variable and the key file hold."""
        return self.secret.decode("ascii")

    def write(self, path: Path) -> None:
        """Writes the key file for workers started by hand (mode 0600, in a directory only its owner can enter)."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, (self.text() + "\n").encode("ascii"))

    def serve(self, socket: zmq.Socket) -> None:
        """Makes `socket` (before it binds) a CURVE server: it accepts only encrypted connections."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def join(self, socket: zmq.Socket) -> None:
        """Makes `socket` (before it connects) a CURVE client of the run's servers, presenting the run's key."""
        socket.curve_serverkey = self.public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def child_env(keys: RunKeys | None, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of a worker this process spawns: this one's, with the run's key (and only this run's: a key
    inherited from elsewhere is dropped)."""
    env = {name: value for name, value in environ.items() if name != RUN_KEY_ENV}
    if keys is not None:
        env[RUN_KEY_ENV] = keys.text()
    return env


class _OnlyRunKey:
    """The ZAP check: a client is admitted if it presents the run's public key (compared in constant time)."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, client_key: bytes) -> bool:
        return hmac.compare_digest(client_key, self.public)


@contextlib.contextmanager
def authenticator(ctx: zmq.Context, keys: RunKeys | None) -> Iterator[None]:
    """Runs the ZAP handler of `ctx` while the block runs (nothing when `keys` is None: no CURVE). Enter it before a
    server socket binds: with no handler, libzmq admits any client whose handshake succeeds. Leave it before
    `ctx.term()`: its thread holds a socket of `ctx`."""
    if keys is None:
        yield
        return
    auth = ThreadAuthenticator(ctx)
    auth.configure_curve_callback(domain="*", credentials_provider=_OnlyRunKey(keys.public))
    auth.start()
    try:
        yield
    finally:
        auth.stop()
