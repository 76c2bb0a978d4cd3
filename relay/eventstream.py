"""The upstream's streaming create, read: Server-Sent Events, one `data:` object per event.

Owns the SSE framing (`EventParser`, pure: `data:` lines joined, comments and other fields
skipped, an event ends at a blank line) and `EventStream`, an open upstream answer read one
event at a time. A stream holds its connection and a small buffer, nothing else, so a process
can follow thousands. It must not know what an event means (streams.py decides) nor touch
the database.
"""

from __future__ import annotations

import aiohttp

# An event is one result object; a line longer than this is not one (aiohttp's LineTooLong).
EVENT_MAX_BYTES = 2**20


class EventParser:
    """Lines in, events' data out (pure)."""

    def __init__(self) -> None:
        self._data: list[bytes] = []

    def feed(self, line: bytes) -> bytes | None:
        """Take one line (its end of line included or not); the event's data when the line
        ends an event that had some, else None."""
        line = line.rstrip(b"\r\n")
        if not line:
            data, self._data = self._data, []
            return b"\n".join(data) if data else None
        if line.startswith(b":"):  # a comment, e.g. a keep-alive
            return None
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append(value.removeprefix(b" "))
        return None


class EventStream:
    """An upstream answer of type text/event-stream, read one event at a time."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response: aiohttp.ClientResponse | None = response
        self._parser = EventParser()

    async def next_event(self) -> bytes | None:
        """The next event's data; None once the stream has ended. Raises aiohttp's errors
        when the connection fails (LineTooLong past EVENT_MAX_BYTES)."""
        response = self._response
        if response is None:
            return None
        while True:
            line = await response.content.readline(max_line_length=EVENT_MAX_BYTES)
            if not line:  # end of stream: an unfinished event is dropped, as SSE says
                self.close()
                return None
            data = self._parser.feed(line)
            if data is not None:
                return data

    def close(self) -> None:
        """Drop the connection (idempotent)."""
        if self._response is not None:
            self._response.close()
            self._response = None
