"""The gateway's media room (`sagellm.gateway.media`): a request's image or audio reference loaded only from where the
operator's `MediaPolicy` allows (data URLs; allowed hosts, fetched over real HTTP from servers on 127.0.0.1; files
inside the allowed directory), under its byte, time and pixel caps, and decoded (PIL; WAV against scipy's reader).
Every refusal is a 400 naming the request's part."""

from __future__ import annotations

import base64
import io
import os
import struct
import wave
import zlib
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import trio
from PIL import Image

from sagellm.common.errors import FieldError
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.media import Audio, MediaPolicy, audio_bytes, load_image
from sagellm.gateway.media.audio import decode_audio

PART = "messages[0].content[1].image_url"
LIMIT = 4096  # the tests' byte cap: the PNG and WAV below are under it


def png(width: int = 4, height: int = 3) -> bytes:
    pixels = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3) * 7  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (IHDR, its checksum fixed) claims `width` x `height`: a decompression bomb's."""
    data = bytearray(png(1, 1))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


async def load_audio(url: str, policy: MediaPolicy, param: str) -> Audio:
    """An `audio_url` part's clip as the engine will decode it from the bytes the gateway checked and sends on."""
    return decode_audio(await audio_bytes({"url": url}, policy, param), param)


async def load_input_audio(data: str, audio_format: str, policy: MediaPolicy, param: str) -> Audio:
    """An `input_audio` part's clip, likewise."""
    return decode_audio(await audio_bytes({"data": data, "format": audio_format}, policy, param), param)


def wav(width: int = 2, channels: int = 2, frames: int = 50, rate: int = 16000) -> bytes:
    """Integer PCM of `width` bytes a sample, random samples over the width's whole range."""
    values = np.random.default_rng(width).integers(-(2 ** (8 * width - 1)), 2 ** (8 * width - 1), frames * channels)
    if width == 1:
        raw = (values + 128).astype(np.uint8).tobytes()  # WAV's 8-bit is unsigned
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in values)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(raw)
    return buffer.getvalue()


def scipy_mono(data: bytes) -> tuple[np.ndarray, int]:
    """The oracle: scipy's WAV reader, scaled to [-1, 1) (it left-justifies 24-bit into int32) and channels averaged."""
    rate, samples = scipy.io.wavfile.read(io.BytesIO(data))
    if samples.dtype == np.uint8:
        scaled = (samples.astype(np.float64) - 128) / 128
    else:
        scaled = samples.astype(np.float64) / 2 ** (8 * samples.dtype.itemsize - 1)
    return scaled.reshape(len(scaled), -1).mean(axis=1), rate


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


async def refusal(loading: Awaitable[object], param: str = PART) -> str:
    """The message of the 400 naming `param` that `loading` raises."""
    with pytest.raises(ApiError) as raised:
        await loading
    assert (raised.value.http_status, raised.value.param) == (400, param), raised.value.message
    return raised.value.message


# --- an HTTP server on 127.0.0.1, in the test's trio loop ---------------------------------------------------------


async def answer(stream: trio.SocketStream, status: str, body: bytes = b"", **headers: str) -> None:
    head = [f"HTTP/1.1 {status}", "connection: close"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    await stream.send_all("\r\n".join(head).encode() + b"\r\n\r\n" + body)


class MediaServer:
    """Each path answers as `routes` says; `paths` lists the paths asked for, so a test sees nothing was fetched."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.port = 0
        self.routes: dict[str, Callable[[trio.SocketStream], Awaitable[None]]] = {
            "/cat.png": partial(answer, status="200 OK", body=png(), content_type="image/png"),
            "/tone.wav": partial(answer, status="200 OK", body=wav(), content_type="audio/wav"),
            "/garbage.png": partial(answer, status="200 OK", body=b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
            "/missing": partial(answer, status="404 Not Found"),
            "/moved": partial(answer, status="302 Found", location="/cat.png"),
            "/away": lambda stream: answer(stream, "302 Found", location=f"http://localhost:{self.port}/cat.png"),
            "/big": partial(answer, status="200 OK", body=b"\0" * (LIMIT + 1), content_length=str(LIMIT + 1)),
            "/big-unsized": self._endless,
            "/stall": self._stall,
        }

    async def handle(self, stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            request += chunk
        path = request.split(b" ", 2)[1].decode()
        self.paths.append(path)
        try:
            await self.routes[path](stream)
        except trio.BrokenResourceError:
            pass  # the client hung up on a body it refused
        finally:
            await stream.aclose()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    @staticmethod
    async def _endless(stream: trio.SocketStream) -> None:
        """A body without Content-Length (ended by closing), longer than any cap."""
        await answer(stream, "200 OK")
        while True:
            await stream.send_all(b"\0" * 1024)

    @staticmethod
    async def _stall(stream: trio.SocketStream) -> None:
        """Headers and the first bytes of the body promised, then nothing."""
        await answer(stream, "200 OK", b"\0" * 10, content_length="100")
        await trio.sleep_forever()


@pytest.fixture
async def server(nursery) -> MediaServer:
    media = MediaServer()
    listeners = await nursery.start(partial(trio.serve_tcp, media.handle, 0, host="127.0.0.1"))
    media.port = listeners[0].socket.getsockname()[1]
    return media


ALLOWED = MediaPolicy(allowed_domains=frozenset({"127.0.0.1"}), max_bytes=LIMIT)


# --- remote media -------------------------------------------------------------------------------------------------


async def test_an_allowed_host_serves_an_image_and_a_wav(server):
    image = await load_image(server.url("/cat.png"), ALLOWED, PART)
    assert np.array_equal(pixels(image), pixels(Image.open(io.BytesIO(png()))))
    audio = await load_audio(server.url("/tone.wav"), ALLOWED, PART)
    expected, rate = scipy_mono(wav())
    assert (audio.sample_rate, audio.samples.dtype) == (rate, np.float32)
    np.testing.assert_allclose(audio.samples, expected, atol=1e-6)


async def test_no_host_is_allowed_by_default_nor_one_off_the_list(server):
    message = await refusal(load_image(server.url("/cat.png"), MediaPolicy(), PART))
    assert "'127.0.0.1' is not allowed" in message and "--allowed-media-domains" in message
    await refusal(load_image(server.url("/cat.png", host="localhost"), ALLOWED, PART))  # the same server, named
    assert server.paths == []  # nothing was fetched


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://user:secret@127.0.0.1/cat.png", "user name or password"),
        ("ftp://127.0.0.1/cat.png", "ftp: URLs are not read"),
        ("gopher://127.0.0.1/", "gopher: URLs are not read"),
        ("", "the URL is empty"),
    ],
)
async def test_userinfo_and_other_schemes_are_refused(url, why):
    assert why in await refusal(load_image(url, ALLOWED, PART))


async def test_a_redirect_is_refused_naming_it_unless_the_operator_follows_them(server):
    message = await refusal(load_image(server.url("/moved"), ALLOWED, PART))
    assert f"redirects to {server.url('/cat.png')}" in message and "not followed" in message
    following = MediaPolicy(allowed_domains=frozenset({"127.0.0.1"}), allow_redirects=True)
    assert (await load_image(server.url("/moved"), following, PART)).size == (4, 3)
    assert "'localhost' is not allowed" in await refusal(load_image(server.url("/away"), following, PART))
    assert server.paths == ["/moved", "/moved", "/cat.png", "/away"]  # the disallowed target never fetched


async def test_a_body_over_the_byte_cap_is_refused_with_or_without_content_length(server):
    assert f"is {LIMIT + 1} bytes, over the limit" in await refusal(load_image(server.url("/big"), ALLOWED, PART))
    assert f"sent over {LIMIT} bytes" in await refusal(load_image(server.url("/big-unsized"), ALLOWED, PART))


async def test_a_stalled_server_is_refused_at_the_time_cap(server, autojump_clock):
    started = trio.current_time()
    message = await refusal(load_image(server.url("/stall"), ALLOWED, PART))
    assert "took over 10 s" in message and trio.current_time() - started == pytest.approx(10, abs=0.01)


async def test_a_failed_fetch_is_a_400_not_a_5xx(server):
    assert "answered HTTP 404" in await refusal(load_image(server.url("/missing"), ALLOWED, PART))
    assert "not an image" in await refusal(load_image(server.url("/garbage.png"), ALLOWED, PART))
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    assert "failed (ConnectError" in await refusal(load_image(f"http://127.0.0.1:{port}/x.png", ALLOWED, PART))


# --- data URLs ----------------------------------------------------------------------------------------------------


async def test_data_urls_of_png_and_jpeg_decode_as_pil_does():
    image = await load_image(data_url("image/png", png()), ALLOWED, PART)
    assert np.array_equal(pixels(image), pixels(Image.open(io.BytesIO(png()))))
    photo = await load_image(data_url("image/jpeg", jpeg()), ALLOWED, PART)
    assert (photo.format, photo.size) == ("JPEG", (8, 8))
    assert np.array_equal(pixels(photo), pixels(Image.open(io.BytesIO(jpeg()))))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (data_url("image/png", png()[:60]), "corrupt or truncated"),
        (data_url("image/png", b"not an image at all"), "not an image"),
        (data_url("text/plain", png()), "must have an image/* type, got 'text/plain'"),
        ("data:image/png," + png().hex(), "only base64 data URLs"),
        ("data:image/png;base64", "has no comma"),
        ("data:image/png;base64,iVBOR*w0KGgo=", "not valid base64"),
        (data_url("image/png", b"\0" * (LIMIT + 3)), "over the limit of 4096 bytes"),
    ],
)
async def test_a_bad_data_url_is_refused(url, why):
    assert why in await refusal(load_image(url, ALLOWED, PART))


async def test_an_image_over_the_pixel_cap_is_refused_before_decoding():
    small = MediaPolicy(max_pixels=11)
    assert "4x3 pixels, over the limit of 11" in await refusal(load_image(data_url("image/png", png()), small, PART))
    bomb = data_url("image/png", png_claiming(100_000, 100_000))  # 10^10 pixels in a few bytes
    assert "too many pixels" in await refusal(load_image(bomb, MediaPolicy(), PART))
    big = MediaPolicy(max_pixels=10**11)  # past PIL's own limit, which still holds
    assert "too many pixels" in await refusal(load_image(bomb, big, PART))


# --- local files --------------------------------------------------------------------------------------------------


@pytest.fixture
def media_dir(tmp_path) -> Path:
    """`allowed/cat.png`, `outside/secret.png`, and `allowed/link.png`: a symlink to the secret."""
    for folder in ("allowed", "outside"):
        (tmp_path / folder).mkdir()
    (tmp_path / "allowed" / "cat.png").write_bytes(png())
    (tmp_path / "outside" / "secret.png").write_bytes(png())
    os.symlink(tmp_path / "outside" / "secret.png", tmp_path / "allowed" / "link.png")
    return tmp_path


async def test_a_local_file_inside_the_allowed_directory_loads_by_path_or_file_url(media_dir):
    policy = MediaPolicy(allowed_local_path=str(media_dir / "allowed"))
    inside = media_dir / "allowed" / "cat.png"
    assert (await load_image(str(inside), policy, PART)).size == (4, 3)
    assert (await load_image(inside.as_uri(), policy, PART)).size == (4, 3)


async def test_local_paths_outside_the_directory_are_refused_however_spelled(media_dir):
    policy = MediaPolicy(allowed_local_path=str(media_dir / "allowed"), max_bytes=LIMIT)
    for path in (
        str(media_dir / "outside" / "secret.png"),
        f"{media_dir}/allowed/../outside/secret.png",
        str(media_dir / "allowed" / "link.png"),  # a symlink out
        (media_dir / "allowed" / "link.png").as_uri(),
    ):
        assert "outside the allowed local media directory" in await refusal(load_image(path, policy, PART)), path
    assert "must be absolute" in await refusal(load_image("cat.png", policy, PART))
    assert "cannot read" in await refusal(load_image(str(media_dir / "allowed" / "nope.png"), policy, PART))
    assert "not on 'elsewhere'" in await refusal(load_image("file://elsewhere/cat.png", policy, PART))
    os.mkfifo(media_dir / "allowed" / "pipe.png")  # opened without waiting for a writer, then refused
    assert "not a regular file" in await refusal(load_image(str(media_dir / "allowed" / "pipe.png"), policy, PART))
    (media_dir / "allowed" / "huge.png").write_bytes(b"\0" * (LIMIT + 1))
    assert "over the limit" in await refusal(load_image(str(media_dir / "allowed" / "huge.png"), policy, PART))
    unset = await refusal(load_image(str(media_dir / "allowed" / "cat.png"), MediaPolicy(), PART))
    assert "--allowed-local-media-path is unset" in unset


# --- audio --------------------------------------------------------------------------------------------------------

AUDIO = "messages[0].content[0].input_audio"


@pytest.mark.parametrize("width", [1, 2, 3, 4])
async def test_input_audio_wav_decodes_to_float32_mono_as_scipy_reads_it(width):
    data = wav(width=width)
    audio = await load_input_audio(base64.b64encode(data).decode(), "wav", ALLOWED, AUDIO)
    expected, rate = scipy_mono(data)
    assert isinstance(audio, Audio) and (audio.sample_rate, audio.samples.shape) == (rate, (50,))
    np.testing.assert_allclose(audio.samples, expected, atol=1e-6)


async def test_mp3_and_unreadable_audio_are_refused_naming_the_field():
    mp3 = b"ID3\x04\0\0\0\0\0\0" + b"\xff\xfb\x90\x00" * 8
    assert "send WAV" in await refusal(load_input_audio("SUQz", "mp3", ALLOWED, AUDIO), f"{AUDIO}.format")
    assert "'wav' or 'mp3'" in await refusal(load_input_audio("", "flac", ALLOWED, AUDIO), f"{AUDIO}.format")
    assert "send WAV" in await refusal(load_audio(data_url("audio/mpeg", mp3), ALLOWED, AUDIO), AUDIO)
    assert "not a WAV file" in await refusal(load_input_audio("AAAA", "wav", ALLOWED, AUDIO), f"{AUDIO}.data")
    floats = io.BytesIO()
    scipy.io.wavfile.write(floats, 16000, np.zeros(8, np.float32))  # IEEE float WAV: not integer PCM
    encoded = base64.b64encode(floats.getvalue()).decode()
    assert "send integer PCM WAV" in await refusal(load_input_audio(encoded, "wav", ALLOWED, AUDIO), f"{AUDIO}.data")
    empty = base64.b64encode(wav(frames=0)).decode()
    assert "holds no samples" in await refusal(load_input_audio(empty, "wav", ALLOWED, AUDIO), f"{AUDIO}.data")
    assert "must have an audio/* type" in await refusal(load_audio(data_url("image/png", png()), ALLOWED, AUDIO), AUDIO)


# --- the policy ---------------------------------------------------------------------------------------------------


def test_the_policy_normalizes_hosts_and_refuses_bad_settings_naming_them(tmp_path):
    assert MediaPolicy(allowed_domains=frozenset({" Example.COM. "})).allows_host("example.com")
    defaults = MediaPolicy()
    assert (defaults.allowed_domains, defaults.allowed_local_path) == (frozenset(), None)
    assert not defaults.allow_redirects
    assert (defaults.max_bytes, defaults.timeout_s, defaults.max_pixels) == (25 * 2**20, 10.0, Image.MAX_IMAGE_PIXELS)
    for domains in ({"example.com:8080"}, {"http://example.com"}, {""}):
        with pytest.raises(FieldError) as raised:
            MediaPolicy(allowed_domains=frozenset(domains))
        assert raised.value.field == "allowed_media_domains"
    with pytest.raises(FieldError) as raised:
        MediaPolicy(allowed_local_path=str(tmp_path / "missing"))
    assert raised.value.field == "allowed_local_media_path"
    with pytest.raises(FieldError):
        MediaPolicy(max_bytes=0)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    assert MediaPolicy(allowed_local_path=str(link)).allowed_local_path == os.path.realpath(tmp_path)
