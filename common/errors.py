"""sageLLM's errors: one family, typed by what the user must do about them.

Every exception the product raises for a reason it can name is a `SageLLMError`. Its kind says what to do and maps,
here and nowhere else, to the `sagellm` command's exit code, the gateway's HTTP status and an OpenAI-style error code:

    kind            exit  HTTP  code              what the user does
    InvalidInput     2    400   invalid_request   fixes the value, flag, file or request named (or the model)
    NotFound         2    404   not_found         names something that exists (a file, an engine, a preset)
    Unavailable      2    503   unavailable       installs or starts what is missing (backend, Ray, gateway, run)
    StartFailed      1    503   start_failed      reads why a worker, rank or server did not start
    Lost             1    503   instance_lost     restarts what ran: a process it worked with went away
    ProtocolError    1    502   protocol_error    runs one version at both ends: a peer broke the wire
    InternalError    1    500   internal          reports a bug: a state our code should never reach
    SageLLMError     1    500   internal          (the base: a named failure of no kind above)

Exit 2: the command cannot work as given, here; change what it was given or the machine. Exit 1: it started and
failed. The CLI prints a SageLLMError as one line, `sagellm CMD: error: MESSAGE`, and exits with its code; anything
else, and an InternalError, is a bug: its traceback is printed. A class whose instances carry their own status (the
gateway's `ApiError`, the client's `APIError`) sets `http_status` per instance.

Each product class picks its kind, and keeps a built-in base (`RuntimeError`, `OSError`) where code catches it by that
base. InvalidInput is a ValueError itself: a bad value is one, so code that catches ValueError catches it too. Kinds
named here because several floors raise them: `FieldError` (a setting's field) and `JoinRefused` (a peer that will not
take this process); `for_status`, `kind_of` and `users_file` turn an HTTP error a server answered, an error another
process of ours sent (its code), and an OSError on a file the user named, into their kinds."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar


class SageLLMError(Exception):
    """A failure sageLLM names; its kind (a subclass) says what the user does about it (the table above)."""

    exit_code: ClassVar[int] = 1
    http_status: int = 500  # an instance may carry its own (an HTTP error passed on)
    code: str = "internal"


class InvalidInput(SageLLMError, ValueError):
    """A value, flag, file or request the user gave is wrong; the message names it and what it may be."""

    exit_code = 2
    http_status = 400
    code = "invalid_request"


class NotFound(SageLLMError):
    """Something the user named does not exist."""

    exit_code = 2
    http_status = 404
    code = "not_found"


class Unavailable(SageLLMError):
    """Something this needs is not here or not up: a backend's software or device, Ray, a gateway, a run."""

    exit_code = 2
    http_status = 503
    code = "unavailable"


class StartFailed(SageLLMError):
    """A worker, rank or server process did not start; the message says why or where its log is."""

    http_status = 503
    code = "start_failed"


class Lost(SageLLMError):
    """A process this one worked with went away mid-run (a rank, a peer, a shared-memory segment's owner)."""

    http_status = 503
    code = "instance_lost"


class ProtocolError(SageLLMError):
    """A peer sent a message the wire does not allow (another version of sageLLM, or not sageLLM at all)."""

    http_status = 502
    code = "protocol_error"


class InternalError(SageLLMError):
    """A state our own code should never reach: a bug to report, shown with its traceback."""


class FieldError(InvalidInput):
    """A value its field does not allow. `field` names the field, so whoever read the value can point at where it was
    written: a graph file's line (`pd.yaml:9: nodes.engine.params.max_num_seqs: ...`), a preset's engine, a request
    body's `param`. The message is a whole sentence that also names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class JoinRefused(InvalidInput):
    """A peer refused to take this process for a reason retrying cannot change (a group that has its worker, a
    gateway that will not add this server: a wrong key, a name it cannot take); the message has its answer."""


def for_status(status: int) -> type[SageLLMError]:
    """The kind an HTTP error a server answered stands for, to a command that got it: the caller's to fix (a 4xx;
    404 NotFound), or the server's (503 and the gateway errors Unavailable; any other 5xx the base)."""
    if status == 404:
        return NotFound
    if 400 <= status < 500:
        return InvalidInput
    return Unavailable if status in (502, 503, 504) else SageLLMError


def kind_of(code: str) -> type[SageLLMError]:
    """The kind whose `code` this is, for an error another process of ours named and sent as its code and message (a
    worker's model that will not load is the user's to fix here too); the base for any other code."""
    kinds = (InvalidInput, NotFound, Unavailable, StartFailed, Lost, ProtocolError)
    return next((kind for kind in kinds if kind.code == code), SageLLMError)


@contextmanager
def users_file(path: object, doing: str) -> Iterator[None]:
    """An OSError on a file the user named (an output it cannot write, an input it cannot read) as the InvalidInput it
    is: `{path}: cannot {doing}: {why}`."""
    try:
        yield
    except OSError as error:
        if isinstance(error, SageLLMError):  # named already (a private file others can read)
            raise
        raise InvalidInput(f"{path}: cannot {doing}: {error.strerror or error}") from None


def check_known(keys: Iterable[object], known: Sequence[str], what: str, at: str = "") -> None:
    """Raises FieldError for the first of a settings mapping's `keys` that is not `known` (a typo), naming the known
    ones: `{at}{key}: unknown {what}; the settings are ...`."""
    for key in keys:
        if key not in known:
            field = f"{at}{key}"
            raise FieldError(field, f"{field}: unknown {what}; the settings are {', '.join(known)}")
