"""The router's HTTP socket: a port already in use is a clear startup error."""
import socket

import pytest

from pdserve.router.app import bind_http_socket


def test_port_in_use_fails_with_a_message_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
            bind_http_socket("127.0.0.1", port)


def test_free_port_binds():
    sock = bind_http_socket("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()
