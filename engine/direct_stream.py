"""The token data plane: one connection per engine call, from the router to the replica.

Ray Serve carries the control plane (load polls, health, chaos, autoscaling, replica
lifecycle). The items of each engine call (engine/server.py ``Item`` tuples, batched as
``EngineReplica.generate`` yields them) go over a plain connection instead of a Ray
streaming call: every Ray message costs about 0.4 ms of CPU across the router, the replica
and Ray's IO threads, which made the router, not the engines, the ceiling
(bench/router_capacity.py). A frame here costs a JSON encode, one socket write and a JSON
decode.

A replica listens on TCP for routers on other hosts and, on Linux, on an abstract Unix
socket for a router on its own host (``unix`` in its address). Abstract Unix names live in
a network namespace, so only a router on the same host (a lab host is a namespace) reaches
one; any other falls back to TCP at once (``dial``). Over loopback TCP each frame's write
runs the whole TCP stack in the sender (profiled: the replica's largest cost per token);
over a Unix socket it is a copy between two buffers.

Wire format: frames of a 4-byte big-endian length and a UTF-8 JSON payload.

* router -> replica, once: ``{"token": ..., "endpoint": ..., "body": {...}}``. The token is
  the replica's own random secret, which the router learns only through Ray (the replica's
  ``load()`` report), so nothing else on the network can submit work.
* replica -> router: one frame per batch, a JSON list of items; then ``{"end": true}``, or
  ``{"error": "..."}`` if the call raised. Either end frame carries ``"load"``, the replica's
  load report as of the call's end, where the replica has one (``StreamServer(report=...)``):
  the router takes it in place of a load poll over Ray (router/pools.py ``Pool.take_report``).

The router cancels a call by closing the connection; the replica sees EOF and stops the
call, which aborts the engine request (the same path as a cancelled Ray stream).

A peer on another host that vanishes without a FIN or a reset (its host partitioned or
powered off) must not hold a connection until TCP gives up, which takes minutes: both ends run TCP keepalive
and ``TCP_USER_TIMEOUT`` (``detect_dead_peer``), so the kernel fails the connection once
data or keepalive probes go unacknowledged for ``DEAD_PEER_TIMEOUT_S``. The router then
sees a broken stream, and the replica aborts the engine request of a router that is gone.
A live peer acknowledges the probes, so a long quiet wait (a long prefill) is not cut.
A peer on the same host cannot vanish that way: the kernel closes a dead process's sockets.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import secrets
import socket
import struct
import sys
import time
from typing import Any, AsyncIterator, Callable, Optional

logger = logging.getLogger("pdserve.direct_stream")

_HEADER = struct.Struct(">I")
MAX_REQUEST_BYTES = 64 << 20  # a request body (prompt) frame
MAX_REPLY_BYTES = 256 << 20  # one batch of items (a long non-streamed answer fits)
REQUEST_READ_TIMEOUT_S = 10.0
# Dead-peer detection on both ends (Linux names; elsewhere keepalive only, at OS defaults).
KEEPALIVE_IDLE_S = 2       # quiet seconds before the first keepalive probe
KEEPALIVE_INTERVAL_S = 1   # between probes
KEEPALIVE_COUNT = 3        # unanswered probes that end the connection
DEAD_PEER_TIMEOUT_S = 5.0  # TCP_USER_TIMEOUT: unacknowledged data or probes this long end it

ServeFn = Callable[[str, dict[str, Any]], AsyncIterator[list]]


class StreamBroken(ConnectionError):
    """The replica's end of a direct stream went away before the call finished."""


class RemoteCallError(RuntimeError):
    """The engine call raised inside the replica; the message is its repr."""


def detect_dead_peer(sock) -> None:
    """Keepalive and TCP_USER_TIMEOUT on one direct-stream socket (once per call, not per frame)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", int(DEAD_PEER_TIMEOUT_S * 1000))):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _tune(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            detect_dead_peer(sock)
        except OSError as e:  # noqa: PERF203 - a socket that refuses the options still works
            logger.warning("direct stream: cannot set dead-peer detection: %r", e)


def encode_frame(payload: Any) -> bytes:
    data = json.dumps(payload, separators=(",", ":")).encode()
    return _HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> Any:
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if n > max_bytes:
        raise ValueError(f"frame of {n} bytes exceeds the limit of {max_bytes}")
    return json.loads(await reader.readexactly(n))


class StreamServer:
    """The replica's side: serves ``serve(endpoint, body)`` calls to authenticated routers."""

    def __init__(self, serve: ServeFn, host: str, report: Optional[Callable[[], dict[str, Any]]] = None) -> None:
        self._serve = serve
        self._report = report  # the load report each call's end frame carries
        self.host = host
        self.port: Optional[int] = None
        self._token = secrets.token_hex(16)
        self._server: Optional[asyncio.base_events.Server] = None
        self._unix_server: Optional[asyncio.base_events.Server] = None
        self.unix_name: Optional[str] = None  # the abstract Unix socket's name, without its leading NUL
        self.active = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        if sys.platform.startswith("linux"):
            name = f"pdserve-stream-{secrets.token_hex(8)}"
            try:
                self._unix_server = await asyncio.start_unix_server(self._connection, "\0" + name)
                self.unix_name = name
            except OSError as e:  # routers on this host use TCP, as routers elsewhere do
                logger.warning("direct stream: no Unix socket for same-host routers: %r", e)

    def address(self) -> dict[str, Any]:
        """What the router needs to call this replica directly (it travels only through Ray)."""
        address = {"host": self.host, "port": self.port, "token": self._token}
        if self.unix_name:
            address["unix"] = self.unix_name
        return address

    async def close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop accepting; let calls in flight finish for up to ``drain_timeout_s``."""
        if self._server is None:
            return
        self._server.close()
        if self._unix_server is not None:
            self._unix_server.close()
            self._unix_server = None
        deadline = asyncio.get_running_loop().time() + drain_timeout_s
        while self.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _tune(writer.transport)
        try:
            request = await asyncio.wait_for(read_frame(reader, MAX_REQUEST_BYTES), REQUEST_READ_TIMEOUT_S)
            token = request.get("token") if isinstance(request, dict) else None
            if not isinstance(token, str) or not hmac.compare_digest(token, self._token):
                raise PermissionError("bad or missing stream token")
            endpoint, body = request["endpoint"], request["body"]
        except asyncio.IncompleteReadError as e:
            if e.partial:  # a frame cut short
                logger.warning("direct stream refused from %s: %r", writer.get_extra_info("peername"), e)
            writer.close()  # closed before any byte: a router's spare connection, never used
            return
        except Exception as e:  # noqa: BLE001 - a bad client gets its connection closed, nothing else
            logger.warning("direct stream refused from %s: %r", writer.get_extra_info("peername"), e)
            writer.close()
            return
        self.active += 1
        pump = asyncio.create_task(self._pump(endpoint, body, writer))
        # EOF or any byte: the router cancelled; an error (reset, or the dead-peer timeout): it is gone
        hangup = asyncio.create_task(reader.read(1))
        try:
            await asyncio.wait({pump, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not pump.done():
                pump.cancel()  # aborts the engine request through the generator's cleanup
                await asyncio.gather(pump, return_exceptions=True)
            hangup.cancel()
            await asyncio.gather(hangup, return_exceptions=True)
            writer.close()
            self.active -= 1

    def _end(self, frame: dict[str, Any]) -> dict[str, Any]:
        if self._report is not None:
            try:
                frame["load"] = self._report()
            except Exception:  # noqa: BLE001 - the router polls over Ray instead; the call still ends
                logger.exception("load report for an end frame failed")
        return frame

    async def _pump(self, endpoint: str, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        gen = self._serve(endpoint, body)
        try:
            async for batch in gen:
                writer.write(encode_frame(batch))
                await writer.drain()
            writer.write(encode_frame(self._end({"end": True})))
            await writer.drain()
        except Exception as e:  # noqa: BLE001 - reported to the router, like a failed Ray call
            if isinstance(e, ConnectionError) or writer.is_closing():
                return  # the router went away (or the dead-peer timeout fired); cleanup aborts the request
            logger.warning("direct stream call %s failed: %r", endpoint, e)
            try:
                writer.write(encode_frame(self._end({"error": repr(e)})))
                await writer.drain()
            except (ConnectionError, TimeoutError):
                pass
        finally:
            await gen.aclose()


class _FrameReader(asyncio.Protocol):
    """Splits the replica's byte stream into frames as they arrive, so the router can take
    every frame that is already here in one go (one batch, one write to its client)."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.frames: collections.deque[bytes] = collections.deque()
        self.closed = False
        self.error: Optional[BaseException] = None
        self._buf = bytearray()
        self._waiter: Optional[asyncio.Future] = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        while len(buf) - start >= _HEADER.size:
            (n,) = _HEADER.unpack_from(buf, start)
            if n > MAX_REPLY_BYTES:
                self.error = ValueError(f"frame of {n} bytes exceeds the limit of {MAX_REPLY_BYTES}")
                self.transport.abort()
                break
            end = start + _HEADER.size + n
            if len(buf) < end:
                break
            self.frames.append(bytes(buf[start + _HEADER.size:end]))
            start = end
        if start:
            del buf[:start]
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        self.error = self.error or exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        while not self.frames and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


class _UnixNames:
    """Abstract Unix names this router could not reach: their replicas are on other hosts (or
    gone), so calls to them dial TCP without trying the name again."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._names: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def add(self, name: str) -> None:
        if len(self._names) >= self.LIMIT:  # replicas come and go; forgetting costs one refused connect
            self._names.clear()
        self._names.add(name)


UNREACHABLE_UNIX = _UnixNames()


async def dial(address: dict[str, Any], timeout_s: float) -> "_FrameReader":
    """A connection to the replica at ``address``: its Unix socket where this router shares
    its host, else TCP with dead-peer detection. Raises OSError or asyncio.TimeoutError when
    the replica cannot be reached either way."""
    loop = asyncio.get_running_loop()
    name = address.get("unix")
    if name and name not in UNREACHABLE_UNIX:
        try:
            _, conn = await asyncio.wait_for(loop.create_unix_connection(_FrameReader, "\0" + name), timeout_s)
            return conn
        except (OSError, asyncio.TimeoutError):
            UNREACHABLE_UNIX.add(name)
    _, conn = await asyncio.wait_for(loop.create_connection(_FrameReader, address["host"], address["port"]),
                                     timeout_s)
    _tune(conn.transport)
    return conn


class SpareConnections:
    """The router's side: one connection per replica, opened ahead of the call that will use it.

    Opening a connection (the connect, the replica's accept, the dead-peer options on both
    ends) was about 0.8 ms of each request's time to first token, spent before the request
    could reach its engine. A call takes its replica's spare, if a fresh one is open, and a
    new spare is opened at once for the next call; a call that finds none connects as before.
    The protocol is unchanged: one call per connection, and the replica cannot tell a spare
    from a connection opened for the call. A spare unused for ``MAX_AGE_S`` is closed
    (``expire``) before the replica's own ``REQUEST_READ_TIMEOUT_S`` would close it, and one
    the replica closed (it died, or stopped) is never handed out."""

    MAX_AGE_S = 3.0

    def __init__(self, connect_timeout_s: float = 2.0) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._spares: dict[tuple[str, int], tuple["_FrameReader", float]] = {}
        self._opening: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks

    @staticmethod
    def _key(address: dict[str, Any]) -> tuple[str, int]:
        return address["host"], int(address["port"])

    def take(self, address: dict[str, Any]) -> Optional["_FrameReader"]:
        """The replica's fresh spare connection, or None; opens the next one either way."""
        key = self._key(address)
        spare = self._spares.pop(key, None)
        self._open_soon(key, address)
        if spare is None:
            return None
        conn, opened = spare
        if conn.closed or conn.frames or time.monotonic() - opened > self.MAX_AGE_S:
            conn.transport.abort()
            return None
        return conn

    def expire(self, now: Optional[float] = None) -> None:
        """Closes every spare older than ``MAX_AGE_S`` or closed by its replica."""
        now = time.monotonic() if now is None else now
        for key, (conn, opened) in list(self._spares.items()):
            if conn.closed or now - opened > self.MAX_AGE_S:
                del self._spares[key]
                conn.transport.close()

    def close(self) -> None:
        for conn, _ in self._spares.values():
            conn.transport.close()
        self._spares.clear()

    def __len__(self) -> int:
        return len(self._spares)

    def _open_soon(self, key: tuple[str, int], address: dict[str, Any]) -> None:
        if key not in self._opening:
            self._opening.add(key)
            task = asyncio.get_running_loop().create_task(self._open(key, address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open(self, key: tuple[str, int], address: dict[str, Any]) -> None:
        try:
            conn = await dial(address, self._connect_timeout_s)
        except (OSError, asyncio.TimeoutError):
            return  # the call that needs it connects itself, and reports the replica down if it fails
        finally:
            self._opening.discard(key)
        old = self._spares.pop(key, None)
        if old is not None:
            old[0].transport.close()
        self._spares[key] = (conn, time.monotonic())


class DirectStream:
    """The router's side of one call: an async iterator of item batches with ``cancel()``,
    the interface of the Ray streaming response it replaces. Each step returns every item
    that has arrived by then, so a router that falls behind writes fewer, larger chunks.

    If the replica cannot be reached at all (it died, or scaled down, since the last load
    poll), or drops the connection before the call ended, ``on_down(error)`` is told (the
    router marks the replica unhealthy at once). The load report an end frame carries goes
    to ``on_report(report)``. An unreachable replica's call then goes
    through ``ray_call()`` if one is given, which Ray Serve routes to a live replica of the
    pool, so nothing has been sent twice; without one, the step raises ``StreamBroken``.
    """

    def __init__(self, address: dict[str, Any], endpoint: str, body: dict[str, Any],
                 ray_call: Optional[Callable[[], Any]] = None, connect_timeout_s: float = 2.0,
                 on_down: Optional[Callable[[BaseException], None]] = None,
                 spares: Optional[SpareConnections] = None,
                 on_report: Optional[Callable[[dict[str, Any]], None]] = None) -> None:
        self._address = address
        self._on_report = on_report
        self._spares = spares
        self._request = {"token": address["token"], "endpoint": endpoint, "body": body}
        self._ray_call = ray_call
        self._on_down = on_down
        self._connect_timeout_s = connect_timeout_s
        self._conn: Optional[_FrameReader] = None
        self._ray_gen = None
        self._control: Optional[dict[str, Any]] = None  # the end/error frame, once read
        self._cancelled = False

    def __aiter__(self) -> "DirectStream":
        return self

    async def __anext__(self) -> list[tuple]:
        if self._ray_gen is not None:
            return await self._ray_gen.__anext__()
        if self._conn is None:
            await self._connect()
            if self._ray_gen is not None:
                return await self._ray_gen.__anext__()
        conn = self._conn
        if self._control is None:
            await conn.wait()
        batch: list[tuple] = []
        while conn.frames and self._control is None:
            payload = json.loads(conn.frames.popleft())
            if isinstance(payload, list):
                batch.extend(tuple(item) for item in payload)
            else:
                self._control = payload
                self._take_report(payload.get("load"))
        if batch:
            return batch
        if self._control is None:  # closed with no end frame: the replica died mid-call
            self._close()
            broken = StreamBroken(f"engine replica {self._where()} closed the stream: {conn.error!r}")
            self._report_down(broken)
            raise broken
        self._close()
        if self._control.get("end"):
            raise StopAsyncIteration
        raise RemoteCallError(self._control.get("error", "unknown error"))

    async def _connect(self) -> None:
        if self._cancelled:
            raise StreamBroken("the call was cancelled")
        spare = self._spares.take(self._address) if self._spares is not None else None
        if spare is not None:
            self._conn = spare
            spare.transport.write(encode_frame(self._request))
            return
        try:
            conn = await dial(self._address, self._connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            self._report_down(e)
            if self._ray_call is None or self._cancelled:
                raise StreamBroken(f"engine replica {self._where()} unreachable: {e!r}") from e
            logger.info("engine replica %s unreachable directly; calling it through Ray", self._where())
            self._ray_gen = self._ray_call()
            return
        self._conn = conn
        if self._cancelled:  # cancelled while connecting
            conn.transport.abort()
            raise StreamBroken("the call was cancelled")
        conn.transport.write(encode_frame(self._request))

    def _where(self) -> str:
        return f"{self._address['host']}:{self._address['port']}"

    def _take_report(self, report: Any) -> None:
        if self._on_report is not None and isinstance(report, dict):
            try:
                self._on_report(report)
            except Exception:  # noqa: BLE001 - a load report must never break the call
                logger.exception("on_report callback failed")

    def _report_down(self, error: BaseException) -> None:
        if self._on_down is not None and not self._cancelled:
            try:
                self._on_down(error)
            except Exception:  # noqa: BLE001 - a report must never break the call's own error path
                logger.exception("on_down callback failed")

    def _close(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()

    def cancel(self) -> None:
        self._cancelled = True
        if self._ray_gen is not None:
            self._ray_gen.cancel()
        if self._conn is not None and self._conn.transport is not None:
            # at once, without a flush: a read waiting on a silent peer ends now
            self._conn.transport.abort()
