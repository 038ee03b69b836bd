"""Response body chunks written by h11's body writer alone, not through its state machine.

Hypercorn hands every body chunk of a response to `h11.Connection.send(h11.Data(...))`. h11
runs each event through its whole state machine: it copies the state dict, fires the
event-triggered and the state-triggered transitions, checks the keep-alive headers, compares
the states before and after, and only then calls the body writer (Content-Length or chunked
framing). For a server sending `Data` while its state is SEND_BODY none of that can change
anything:

- the event-triggered transition for (SERVER, SEND_BODY, Data) is SEND_BODY itself;
- the state-triggered transitions depend only on the two states, the keep-alive flag and
  the pending protocol switches, none of which a `Data` event changes, and they reached
  their fixed point when the last event that did change one was processed;
- the rest of `_process_event` concerns requests, responses, a client's events or the
  100-continue flag of a client;
- with no state changed, `_respond_to_state_changes` keeps the writer and the reader.

So the chunk goes straight to the writer h11 chose when the response started, as h11 would
send it; an error from the writer (more data than the Content-Length) puts the connection
in ERROR, as h11 does. Any other event, role or state goes to h11's own `send`. A stream of
a few hundred chunks paid for the state machine on every one of them.

`install()` replaces `h11.Connection.send`; `gateway.asgi` (the app `sluicegate serve`
runs) installs it. Mounted into a host's app, the gateway leaves the host's h11 alone. An
h11 without the expected attributes is left as it is.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sluicegate")

__all__ = ["install", "installed"]

_original: Callable[..., Any] | None = None


def installed() -> bool:
    return _original is not None


def install() -> bool:
    """Puts the shortcut in front of `h11.Connection.send` (once); False when h11 is not the
    shape this was written against, and then nothing changes."""
    global _original
    if _original is not None:
        return True
    try:
        import h11
        from h11._connection import Connection
    except ImportError:
        return False
    found: Callable[..., Any] | None = getattr(Connection, "send", None)
    probe = Connection(h11.SERVER)
    if found is None or not all(hasattr(probe, name) for name in (
            "_cstate", "_writer", "_process_error", "our_role")) \
            or not hasattr(probe._cstate, "states"):
        logger.info("h11 %s: response bodies keep h11's own send",
                    getattr(sys.modules.get("h11"), "__version__", "?"))
        return False
    original = found
    data, server, send_body = h11.Data, h11.SERVER, h11.SEND_BODY

    def send(self: Any, event: Any) -> bytes | None:
        if type(event) is not data or self.our_role is not server \
                or self._cstate.states[server] is not send_body:
            result: bytes | None = original(self, event)
            return result
        written: list[bytes] = []
        try:
            self._writer(event, written.append)
        except BaseException:
            self._process_error(server)
            raise
        return b"".join(written)

    Connection.send = send  # type: ignore[method-assign,assignment]
    _original = original
    return True
