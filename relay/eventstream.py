"""Server-Sent Events framing, pure: the events' data in a stream of lines.

`data:` lines are joined with newlines, comments and other fields are skipped, and an event
ends at a blank line (https://html.spec.whatwg.org/multipage/server-sent-events.html). The
upstream's streaming create sends one result object per event. No I/O here (ssecreate.py
reads the connection) and no meaning (streams.py decides what an event says).
"""

from __future__ import annotations

# An event is one result object; a line longer than this is not one.
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
