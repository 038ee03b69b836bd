"""Body chunks through h11 without its state machine, both ways.

Hypercorn hands every body chunk of a response to `h11.Connection.send(h11.Data(...))`, and
h11 hands it every chunk of a request body as a `Data` event from `next_event()`. h11 runs
each such event through its whole state machine (`_process_event`): it copies the state
dict, fires the event-triggered and the state-triggered transitions, checks the keep-alive
headers, compares the states before and after. For a `Data` event of a peer whose state is
SEND_BODY none of that can change anything:

- the event-triggered transition for (SEND_BODY, Data) is SEND_BODY itself, for either role;
- the state-triggered transitions depend only on the two states, the keep-alive flag and
  the pending protocol switches, none of which a `Data` event changes, and they reached
  their fixed point when the last thing that did change one was processed;
- the rest concerns requests and responses, except one flag: a client's `Data` means it no
  longer waits for a 100 Continue (`client_is_waiting_for_100_continue`), set here as h11
  sets it;
- with no state changed, `_respond_to_state_changes` keeps the writer and the reader.

So `_process_event` returns at once for such an event (setting that flag for a client's),
and a server's `send` of a `Data` in SEND_BODY goes straight to the body writer h11 chose
when the response started (Content-Length, chunked or HTTP/1.0 framing); an error from the
writer (more data than the Content-Length) puts the connection in ERROR, as h11 does. Any
other event, role or state goes to h11's own code. A stream of a few hundred chunks paid for
the state machine on every one of them.

`install()` replaces `h11.Connection.send` and `h11.Connection._process_event`;
`gateway.asgi` (the app `sluicegate serve` runs) installs it. Mounted into a host's app, the
gateway leaves the host's h11 alone. An h11 without the expected attributes is left as it
is.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("sluicegate")

__all__ = ["install", "installed"]

_original: Callable[..., Any] | None = None
_original_process_event: Callable[..., Any] | None = None


def installed() -> bool:
    return _original is not None


def install() -> bool:
    """Puts the shortcut in front of `h11.Connection.send` (once); False when h11 is not the
    shape this was written against, and then nothing changes."""
    global _original, _original_process_event
    if _original is not None:
        return True
    try:
        import h11
        from h11._connection import Connection
    except ImportError:
        return False
    found: Callable[..., Any] | None = getattr(Connection, "send", None)
    process: Callable[..., Any] | None = getattr(Connection, "_process_event", None)
    probe = Connection(h11.SERVER)
    if found is None or process is None or not all(hasattr(probe, name) for name in (
            "_cstate", "_writer", "_process_error", "our_role",
            "client_is_waiting_for_100_continue")) or not hasattr(probe._cstate, "states"):
        logger.info("h11 %s: response bodies keep h11's own send",
                    getattr(sys.modules.get("h11"), "__version__", "?"))
        return False
    original, original_process_event = found, process
    data, client, server, send_body = h11.Data, h11.CLIENT, h11.SERVER, h11.SEND_BODY

    def process_event(self: Any, role: Any, event: Any) -> None:
        if type(event) is data and self._cstate.states[role] is send_body:
            if role is client:
                self.client_is_waiting_for_100_continue = False
            return
        original_process_event(self, role, event)

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
    Connection._process_event = process_event  # type: ignore[method-assign]
    _original, _original_process_event = original, original_process_event
    return True
