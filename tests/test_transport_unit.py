"""The websocket edge's per-connection object, without a socket."""

from __future__ import annotations

import sys

from service.transport import LeanWebsocket, SignalingServerProtocol


def test_an_idle_connection_keeps_a_small_shared_key_dict() -> None:
    """CPython shares an instance __dict__'s keys with its class only up to 30 attributes;
    past that every connection carries a 1.6 KB dict of its own instead of ~0.3 KB (this
    happened once: +1.4 KB per idle connection in the benchmark)."""
    ws = LeanWebsocket(SignalingServerProtocol())
    ws.fast = None  # set per connection by the read loop
    assert len(vars(ws)) < 30
    assert sys.getsizeof(vars(ws)) < 600
    # what Sanic's methods read is there
    for name in ("conn_mutex", "recv_cancel", "data_finished_fut", "keepalive_ping_task",
                 "auto_closer_task", "connection_lost_waiter", "pause_frame_fut", "can_pause"):
        assert hasattr(ws, name)
