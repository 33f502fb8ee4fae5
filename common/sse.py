"""Reading a server-sent event stream (`text/event-stream`), as OpenAI-compatible servers stream completions."""

from __future__ import annotations

from collections.abc import AsyncIterator


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each event in `lines` (a reply's text lines): an event's `data:` lines joined by newlines, sent
    when the blank line that ends the event arrives (or the stream ends); comments and other fields are skipped."""
    data: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield "\n".join(data)
            data = []
    if data:
        yield "\n".join(data)
