"""The test helpers that stand in for an unreachable server keep it unreachable."""

from __future__ import annotations

import socket

import pytest

from tests.support import closed_port

pytestmark = pytest.mark.quick


def test_the_closed_port_refuses_connections_and_no_server_can_take_it():
    port = closed_port()
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", port))
    # gRPC servers (Ray's) bind with SO_REUSEPORT; a port bound and released was taken that way.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError, match="in use"):
            server.bind(("127.0.0.1", port))
    assert closed_port() == port
