"""vLLM's `uuid` on a chat's media part: a client names an image or clip once, sending its data, and later parts
may give the name alone (`{"type": "image_url", "image_url": null, "uuid": "..."}`), so an agent re-sending a long
conversation does not upload its pictures again.

The files are kept here, in the gateway's memory, bounded in bytes and evicting the least recently used, and under
the API key that sent them: a uuid names media only for its sender, so one user can never make the server read
another's picture by guessing its name. The name is a handle, never the media's identity: the engine keys its
encoder cache and prefix cache by the content, so two different images sent under the same uuid never share
features or KV (where vLLM trusts the uuid as the content's hash). A uuid the server does not hold (never sent, or
evicted) is a 400 asking for the data."""

from __future__ import annotations

from collections import OrderedDict

from sagellm.gateway.http.errors import ApiError

MAX_UUID_CHARS = 256
KEPT_BYTES = 256 * 1024 * 1024  # the files all senders' uuids name together


class MediaByUuid:
    def __init__(self, max_bytes: int = KEPT_BYTES) -> None:
        self.max_bytes = max_bytes
        self._files: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()  # (owner, modality, uuid) -> file
        self._bytes = 0

    def remember(self, owner: str, modality: str, uuid: str, data: bytes) -> None:
        """Keeps `data` as `owner`'s `modality` named `uuid` (replacing what the name held), the least recently used
        files let go past the byte cap."""
        key = (owner, modality, uuid)
        self._bytes += len(data) - len(self._files.pop(key, b""))
        self._files[key] = data
        while self._bytes > self.max_bytes and len(self._files) > 1:
            _, dropped = self._files.popitem(last=False)
            self._bytes -= len(dropped)

    def recall(self, owner: str, modality: str, uuid: str, param: str) -> bytes:
        """The file `owner` sent as `uuid`; a 400 naming `param` when it holds none."""
        data = self._files.get((owner, modality, uuid))
        if data is None:
            raise ApiError(400, f"{param}: no {modality} with uuid {uuid!r} is held for this sender (never sent with "
                                "its data, or let go since): send the data with the uuid", param=param)  # fmt: skip
        self._files.move_to_end((owner, modality, uuid))
        return data

    def __len__(self) -> int:
        return len(self._files)
