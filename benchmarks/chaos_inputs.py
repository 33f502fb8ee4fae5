"""The chaos benchmark's phases of bad input: the hand-made cases of `chaos_cases` beside innocent streams, junk on
every ZeroMQ socket of the run, and bad files given to `sagellm run` (a YAML alias bomb, a model file cut in half).
Each must get a clear error, soon, and hurt nothing else."""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import trio
import zmq

from sagellm.benchmarks.chaos_cases import BAD_INPUTS
from sagellm.benchmarks.chaos_report import Row, lost_count, progress, tally
from sagellm.benchmarks.chaos_server import SAGELLM, Server
from sagellm.benchmarks.chaos_streams import stream


async def bad_inputs(client: httpx.AsyncClient) -> Row:
    progress(f"bad inputs: {len(BAD_INPUTS)} cases beside 8 streams")
    ends: list[list[str]] = [[] for _ in range(8)]
    statuses: list[int] = []
    async with trio.open_nursery() as nursery:
        for i, e in enumerate(ends):
            nursery.start_soon(stream, client, f"innocent {i}", 64, e, [])
        await trio.sleep(0.2)
        for case in BAD_INPUTS:
            reply = await client.request(
                case.method, case.path, json=case.json, content=case.content, headers=case.headers
            )
            statuses.append(reply.status_code)
    wrong = [c.name for c, s in zip(BAD_INPUTS, statuses, strict=True) if s != c.status]
    answers = tally([str(s) for s in statuses]) + (f"; unexpected: {', '.join(wrong)}" if wrong else ", all as due")
    return Row(
        f"bad inputs ({len(BAD_INPUTS)} kinds) beside 8 streams",
        f"{len(BAD_INPUTS)} requests",
        answers + f"; streams: {tally([x for e in ends for x in e])}",
        server_errors=sum(s >= 500 for s in statuses),
        lost=lost_count(ends, {"length"}) + len(wrong),
    )


def junk_messages(rng: random.Random) -> list[list[bytes]]:
    """What a stranger on the network can send: random bytes, truncated or lying msgpack, names that are not UTF-8."""
    messages = [[rng.randbytes(rng.randint(1, 64)) for _ in range(rng.randint(1, 5))] for _ in range(40)]
    messages += [
        [b"\xff\xfe", b"\x80", b"\x01", b"x"],
        [b"decode", b"source", b"\x01", b"\x92\x01"],
        [b"decode", b"source", b"\x01", b"\xdd\xff\xff\xff\xff"],
        [b"decode", b"source", b"\x01", b"\xc1" * 1000],
        [b"\x05", b"\x94\xa6decode\x01\xa1h\x02"],  # a Hello in the wrong place
        [rng.randbytes(1 << 20)],  # 1 MiB of noise
    ]
    return messages


async def junk(client: httpx.AsyncClient, server: Server, rng: random.Random) -> Row:
    sockets = sorted(server.ipc.iterdir())
    messages = junk_messages(rng)
    before = server.workers()
    progress(f"junk: {len(messages)} messages to each of {len(sockets)} sockets")
    zctx = zmq.Context()
    try:
        for path in sockets:
            kind = zmq.DEALER if path.name.startswith("control") else zmq.PUSH
            with zctx.socket(kind) as sock:
                sock.setsockopt(zmq.LINGER, 2000)
                sock.connect(f"ipc://{path}")
                for frames in messages:
                    sock.send_multipart(frames)
    finally:
        zctx.term()
    await trio.sleep(1.0)
    ends: list[str] = []
    await stream(client, "after the junk", 16, ends, [])
    same = server.workers() == before
    answers = f"no process died: {'yes' if same else 'NO'}; a request after: {tally(ends)}"
    return Row("junk on every ZeroMQ socket", f"{len(messages) * len(sockets)} messages, {len(sockets)} sockets",
               answers, lost=lost_count([ends], {"length"}) + (not same))  # fmt: skip


async def _sagellm_run(arguments: list[str], timeout_s: float = 300) -> tuple[int | None, float, str]:
    """Exit code (None: still running at the timeout, a hang), seconds taken and the last line of stderr."""
    started = time.monotonic()
    with trio.move_on_after(timeout_s):
        done = await trio.run_process([*SAGELLM, "run", *arguments], capture_stdout=True, capture_stderr=True,
                                      check=False)  # fmt: skip
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return done.returncode, time.monotonic() - started, last[0][:160]
    return None, timeout_s, "still running: a hang"


async def alias_bomb(work: Path) -> Row:
    progress("files: a YAML alias bomb")
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = work / "bomb.yaml"
    path.write_text("\n".join(levels) + "\nnodes: {}\n")
    code, took, said = await _sagellm_run([str(path), "--prompt", "hi"])
    ok = code not in (None, 0)
    return Row("YAML alias bomb (10^10 nodes)", "sagellm run", f"exit {code} in {took:.1f} s: {said}", lost=int(not ok))


async def truncated_model(work: Path, model: str | None) -> Row:
    progress("files: a truncated model file")
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model  # loads nothing heavy

    source = Path(resolve_model(model or DEFAULT_MODEL))
    source = source if source.is_file() else next(iter([*source.glob("*.gguf"), *source.glob("*.safetensors")]), source)
    if not source.is_file():
        return Row("truncated model file", "skipped", f"no single model file in {source}")
    target = work / "truncated" / source.name
    target.parent.mkdir()
    with source.open("rb") as src:
        target.write_bytes(src.read(source.stat().st_size // 2))
    code, took, said = await _sagellm_run(["graphs/colocated.yaml", "--model", str(target), "--prompt", "hi"])
    ok = code not in (None, 0)
    return Row(f"model file cut in half ({source.suffix})", "sagellm run", f"exit {code} in {took:.1f} s: {said}",
               lost=int(not ok))  # fmt: skip
