"""The direct token stream (engine/direct_stream.py) over real loopback sockets, without Ray."""
from __future__ import annotations

import asyncio
import socket

import pytest

from pdserve.engine.direct_stream import (DirectStream, RemoteCallError, StreamBroken, StreamServer, encode_frame,
                                          read_frame)


class Calls:
    """A serve function that records how each call ended."""

    def __init__(self, batches, *, hold=False, fail=None):
        self.batches = batches
        self.hold = hold
        self.fail = fail
        self.seen: list[tuple[str, dict]] = []
        self.ended: list[str] = []
        self.started = asyncio.Event()

    async def __call__(self, endpoint, body):
        self.seen.append((endpoint, body))
        try:
            for b in self.batches:
                yield b
            self.started.set()
            if self.fail:
                raise self.fail
            if self.hold:
                await asyncio.sleep(3600)
            self.ended.append("finished")
        except (asyncio.CancelledError, GeneratorExit):
            self.ended.append("aborted")
            raise


async def _drain(stream) -> list:
    out = []
    async for batch in stream:
        out.append(batch)
    return out


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_items_arrive_in_order_as_tuples_and_the_call_sees_the_body():
    async def main():
        calls = Calls([[("meta", {"replica": "r"}), ("sse", "data: a\n\n")], [("sse", "data: [DONE]\n\n")]])
        srv = StreamServer(calls, "127.0.0.1")
        await srv.start()
        got = await _drain(DirectStream(srv.address(), "chat", {"messages": [{"role": "user", "content": "hi"}]}))
        await srv.close()
        return calls, got

    calls, got = _run(main())
    # batches already waiting when the router reads are handed over as one
    assert [it for b in got for it in b] == [("meta", {"replica": "r"}), ("sse", "data: a\n\n"),
                                            ("sse", "data: [DONE]\n\n")]
    assert calls.seen == [("chat", {"messages": [{"role": "user", "content": "hi"}]})]
    assert calls.ended == ["finished"]


def test_cancel_closes_the_connection_and_aborts_the_call_in_the_replica():
    async def main():
        calls = Calls([[("sse", "x")]], hold=True)
        srv = StreamServer(calls, "127.0.0.1")
        await srv.start()
        stream = DirectStream(srv.address(), "chat", {})
        assert await stream.__anext__() == [("sse", "x")]
        await calls.started.wait()
        stream.cancel()
        for _ in range(100):
            if calls.ended:
                break
            await asyncio.sleep(0.02)
        active = srv.active
        await srv.close()
        return calls.ended, active

    ended, active = _run(main())
    assert ended == ["aborted"] and active == 0


def test_an_exception_in_the_call_reaches_the_router_as_an_error():
    async def main():
        srv = StreamServer(Calls([[("sse", "x")]], fail=RuntimeError("engine dead")), "127.0.0.1")
        await srv.start()
        stream = DirectStream(srv.address(), "chat", {})
        first = await stream.__anext__()
        with pytest.raises(RemoteCallError, match="engine dead"):
            await stream.__anext__()
        await srv.close()
        return first

    assert _run(main()) == [("sse", "x")]


def test_a_wrong_token_is_refused_and_runs_nothing():
    async def main():
        calls = Calls([[("sse", "x")]])
        srv = StreamServer(calls, "127.0.0.1")
        await srv.start()
        forged = dict(srv.address(), token="0" * 32)
        with pytest.raises(StreamBroken):
            await DirectStream(forged, "chat", {}).__anext__()
        # a raw client with no token at all
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(encode_frame({"endpoint": "chat", "body": {}}))
        assert await reader.read() == b""
        writer.close()
        await srv.close()
        return calls.seen

    assert _run(main()) == []


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_replica_that_dies_mid_stream_is_a_broken_stream(transport):
    async def main():
        async def fake_replica(reader, writer):
            await read_frame(reader, 1 << 20)
            writer.write(encode_frame([["sse", "one"]]))
            await writer.drain()
            writer.transport.abort()  # the process died: no end frame

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        address = {"host": "127.0.0.1", "port": port, "token": "t"}
        if transport == "tcp":  # a replica on another host
            listener.listen()
            server = await asyncio.start_server(fake_replica, sock=listener)
        else:  # on the router's host; its TCP port never listens, so only the Unix socket serves the call
            address["unix"] = "pdserve-stream-test-dies"
            server = await asyncio.start_unix_server(fake_replica, "\0" + address["unix"])
        stream = DirectStream(address, "chat", {})
        first = await stream.__anext__()
        with pytest.raises(StreamBroken):
            await stream.__anext__()
        server.close()
        listener.close()
        return first

    assert _run(main()) == [("sse", "one")]


def test_an_unreachable_replica_is_called_through_ray_instead():
    class RayStream:
        def __init__(self):
            self.items = [[("meta", {"replica": "other"})]]
            self.cancelled = False

        async def __anext__(self):
            if not self.items:
                raise StopAsyncIteration
            return self.items.pop(0)

        def cancel(self):
            self.cancelled = True

    async def main():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        made = []

        def ray_call():
            made.append(RayStream())
            return made[0]

        got = await _drain(DirectStream({"host": "127.0.0.1", "port": port, "token": "t"}, "chat", {},
                                        ray_call=ray_call))
        return got, len(made)

    got, n = _run(main())
    assert got == [[("meta", {"replica": "other"})]] and n == 1


def _accepted_families(srv: StreamServer) -> list:
    """The address family of each connection the replica accepts (wraps its handler before start())."""
    accepted = []
    handler = srv._connection

    async def counted(reader, writer):
        accepted.append(writer.get_extra_info("socket").family)
        await handler(reader, writer)

    srv._connection = counted
    return accepted


def test_the_next_call_goes_over_the_spare_opened_after_the_last():
    from pdserve.engine.direct_stream import SpareConnections

    async def main():
        calls = Calls([[("sse", "data: [DONE]\n\n")]])
        srv = StreamServer(calls, "127.0.0.1")
        accepted = _accepted_families(srv)
        await srv.start()
        spares = SpareConnections()
        assert await _drain(DirectStream(srv.address(), "chat", {"n": 1}, spares=spares)) == [[("sse", "data: [DONE]\n\n")]]
        while not len(spares):
            await asyncio.sleep(0.01)
        assert len(accepted) == 2  # the call's own connection, then the spare
        got = await _drain(DirectStream(srv.address(), "chat", {"n": 2}, spares=spares))
        while not len(spares):
            await asyncio.sleep(0.01)
        spares.close()
        await srv.close()
        return calls, got, len(accepted)

    calls, got, accepted = _run(main())
    assert got == [[("sse", "data: [DONE]\n\n")]]
    assert [body for _, body in calls.seen] == [{"n": 1}, {"n": 2}]
    assert accepted == 3  # the second call opened no connection of its own, only the next spare


def test_a_spare_the_replica_closed_is_not_used_and_an_unused_one_closes_quietly(caplog):
    from pdserve.engine.direct_stream import SpareConnections

    async def main():
        calls = Calls([[("sse", "data: [DONE]\n\n")]])
        srv = StreamServer(calls, "127.0.0.1")
        await srv.start()
        spares = SpareConnections()
        assert spares.take(srv.address()) is None  # none yet: one is opened
        while not len(spares):
            await asyncio.sleep(0.01)
        (conn, _), = spares._spares.values()
        conn.transport.abort()  # as if the replica had gone
        await asyncio.sleep(0.05)
        got = await _drain(DirectStream(srv.address(), "chat", {}, spares=spares))  # connects itself
        while not len(spares):
            await asyncio.sleep(0.01)
        spares.expire(asyncio.get_running_loop().time() + SpareConnections.MAX_AGE_S + 3600)
        assert not len(spares)
        await asyncio.sleep(0.1)  # the replica sees the unused spare close
        await srv.close()
        return got

    with caplog.at_level("WARNING", logger="pdserve.direct_stream"):
        assert _run(main()) == [[("sse", "data: [DONE]\n\n")]]
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_the_end_frame_carries_the_replicas_load_report_to_the_router():
    async def main():
        reports = iter([{"replica": "r", "running": 0}, {"replica": "r", "running": 1}])
        ok, failing = Calls([[("sse", "data: a\n\n")]]), Calls([[("sse", "data: a\n\n")]], fail=RuntimeError("boom"))
        got = []
        for calls in (ok, failing):
            srv = StreamServer(calls, "127.0.0.1", report=lambda: next(reports))
            await srv.start()
            try:
                await _drain(DirectStream(srv.address(), "chat", {}, on_report=got.append))
            except RemoteCallError:
                got.append("error")
            await srv.close()
        return got

    # a call that ends well, and one that raises: both end frames carry the report as of the end
    assert _run(main()) == [{"replica": "r", "running": 0}, {"replica": "r", "running": 1}, "error"]


def test_a_report_that_fails_leaves_the_call_whole_and_reports_nothing():
    async def main():
        def broken():
            raise OSError("stat failed")

        srv = StreamServer(Calls([[("sse", "data: a\n\n")]]), "127.0.0.1", report=broken)
        await srv.start()
        got = []
        out = await _drain(DirectStream(srv.address(), "chat", {}, on_report=got.append))
        await srv.close()
        return out, got

    out, got = _run(main())
    assert out == [[("sse", "data: a\n\n")]] and got == []


def test_a_router_on_the_replicas_host_calls_over_its_unix_socket_and_one_elsewhere_over_tcp():
    from pdserve.engine.direct_stream import UNREACHABLE_UNIX

    async def main():
        calls = Calls([[("sse", "data: a\n\n")], [("sse", "data: [DONE]\n\n")]])
        srv = StreamServer(calls, "127.0.0.1")
        families = _accepted_families(srv)
        await srv.start()
        here = srv.address()
        # a replica whose Unix name this host does not have: on another host (network namespace)
        elsewhere = dict(here, unix="pdserve-stream-on-another-host")
        got = [await _drain(DirectStream(here, "chat", {})), await _drain(DirectStream(elsewhere, "chat", {}))]
        await srv.close()
        return here, got, families

    here, got, families = _run(main())
    assert here["unix"].startswith("pdserve-stream-")
    items = [[item for batch in call for item in batch] for call in got]  # however the frames were batched
    assert items == [[("sse", "data: a\n\n"), ("sse", "data: [DONE]\n\n")]] * 2
    assert families == [socket.AF_UNIX, socket.AF_INET]
    assert "pdserve-stream-on-another-host" in UNREACHABLE_UNIX  # the next call dials TCP at once

