"""Relays a decode stream to the client, counting its tokens, and resumes it mid-stream.

When the stream ends before ``[DONE]`` (the engine or its replica died, or the pool gave
the leg up), the relay asks for a continuation on another engine (decode/resume.py) and
rewrites its chunks into the original stream's format; when none can be had, the client
gets an error event and the stream ends cleanly. Which engine serves a continuation is
the caller's choice (``respawn``): the router's selection, not this module's.

A stream that breaks after its head but before any chunk (the client has its status and
headers, nothing else) is not resumed but served again whole (``move_whole``), as a leg
lost before its first item is: exact for every request shape, as nothing was sent.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable, Optional

from pdserve.decode.resume import StreamTracker, error_event, hide_token_ids
from pdserve.engine.leg import Leg

logger = logging.getLogger("pdserve.router")

EXHAUSTED_MESSAGE = "the engine serving this stream failed and it could not be resumed"


def carries_token(chunk: str) -> bool:
    """Whether an SSE chunk carries generated text (for streams whose chunks carry no token ids)."""
    if chunk.startswith("data: [DONE]"):
        return False
    return '"content":"' in chunk.replace('"content":""', "") or '"text":"' in chunk.replace('"text":""', "")


class StreamRelay:
    """One streamed response: the chunks to send, the tokens they carried and when.

    ``respawn(dead_leg, continuation_body)`` returns a leg serving the continuation, or
    None. ``on_gap(seconds)`` sees every gap between two token-carrying sends (ITL);
    ``on_resume(outcome)`` sees "resumed" or "exhausted". ``hide_ids``: the router asked
    for token ids the client did not, so the client is sent the chunks as vLLM writes them
    without (``hide_token_ids``), after the tracker read them. ``detokenize(ids)``: the text of
    output token ids, as the engine writes it; with it, text vLLM held back at a cut (a stream
    with stop strings) is sent ahead of the continuation's (``StreamTracker.recover_held_back``)."""

    def __init__(self, endpoint: str, leg: Leg, body: dict[str, Any], *, served_name: str, max_resumes: int,
                 t0: float, respawn: Callable[[Leg, dict[str, Any]], Optional[Leg]],
                 on_gap: Callable[[float], None] = lambda s: None,
                 on_resume: Callable[[str], None] = lambda outcome: None, hide_ids: bool = False,
                 max_model_len: Optional[int] = None,
                 detokenize: Optional[Callable[[list[int]], str]] = None,
                 first_chunk_timeout_s: Optional[float] = None,
                 move_whole: Optional[Callable[[Leg], Optional[Leg]]] = None) -> None:
        self.tracker = StreamTracker(endpoint, track_text=detokenize is not None and bool(body.get("stop")))
        self.detokenize = detokenize
        self.leg = leg  # the leg serving the stream now (a continuation's after a resume)
        self.body = body
        self.served_name = served_name
        self.max_resumes = max_resumes
        self.t0 = t0
        self.respawn = respawn
        self.on_gap = on_gap
        self.on_resume = on_resume
        self.hide_ids = hide_ids
        self.max_model_len = max_model_len
        self.first_chunk_timeout_s = first_chunk_timeout_s
        self.move_whole = move_whole
        self.resumes = 0
        self.moves = 0  # times the whole request moved to another engine before any chunk came
        self.chunks = 0  # chunks received (from every leg)
        self.ttft: Optional[float] = None
        self.last: Optional[float] = None  # when the last token-carrying chunk was sent
        self.tokens = 0
        self.status = "200"  # as counted in pdserve_requests_total (503: resume exhausted)
        self.completed = False  # False if the client went away (the generator was closed)

    async def run(self, first_chunk: Optional[str]) -> AsyncIterator[str]:
        """The client's chunks, from ``first_chunk`` on (None: the leg has sent only its head)."""
        with self.leg.pool.track(self.leg.replica_id):
            pending: Optional[list[str]] = ([] if first_chunk is None else [first_chunk]) + self.leg.ready_chunks()
            while True:
                if pending:
                    text = self._take(pending)
                    if text:
                        yield text
                if self.tracker.done:
                    break
                pending = await self._next_chunks()
                if pending is None:
                    # The stream ended before [DONE]: resume it elsewhere, or end it cleanly.
                    if not self._resume():
                        self.status = "503"
                        yield error_event(EXHAUSTED_MESSAGE)
                        break
                    pending = []
        self.completed = True

    def _take(self, pending: list[str]) -> str:
        """The text to send for ``pending``; counts its tokens."""
        self.chunks += len(pending)
        text = "".join(pending)
        if self.resumes:
            text = self.tracker.rewrite(text)
        before = len(self.tracker.sent_ids)
        self.tracker.observe(text)
        # Stream chunks carry their token ids; count text chunks only where none do.
        n = len(self.tracker.sent_ids) - before or sum(1 for c in pending if carries_token(c))
        if n:
            now = time.perf_counter()
            if self.ttft is None:
                self.ttft = now - self.t0
            elif self.last is not None:
                self.on_gap(now - self.last)
            self.tokens += n
            self.last = now
        return hide_token_ids(text) if self.hide_ids else text

    async def _next_chunks(self) -> Optional[list[str]]:
        """The next chunks of the current leg; None when it ended or broke. Before any chunk
        has come, the wait is bounded by ``first_chunk_timeout_s`` (an engine that accepted the
        stream and hangs is given up like one that died)."""
        try:
            while True:
                if self.ttft is None and self.first_chunk_timeout_s is not None:
                    item = await asyncio.wait_for(self.leg.next_item(), self.first_chunk_timeout_s)
                else:
                    item = await self.leg.next_item()
                if item is None or item[0] != "head":  # a continuation's head: nothing to send
                    break
            if item is not None and item[0] != "sse":  # an engine that refused the request after all
                raise RuntimeError(f"a {item[0]} item where the stream's chunks were due: {item[1:]!r}")
        except (Exception, asyncio.TimeoutError) as e:  # noqa: BLE001 - the engine or its replica died mid-stream
            logger.warning("stream from %s broke after %d tokens: %r", self.leg.served_by or self.leg.replica_id,
                           len(self.tracker.sent_ids), e)
            item = None
        if item is None:
            return None
        return [item[1]] + self.leg.ready_chunks()

    def _resume(self) -> bool:
        if not self.chunks and self.move_whole is not None:
            return self._move_whole()
        new_leg = None
        if self.resumes + self.moves < self.max_resumes and self.tracker.can_resume(self.body):
            new_leg = self.respawn(self.leg, self.tracker.continuation(self.body, self.served_name, self.max_model_len))
            self.tracker.recover_held_back(self.detokenize)
        if new_leg is None:
            self.on_resume("exhausted")
            return False
        logger.warning("resuming a stream on %s replica %s after %d tokens", new_leg.pool.name, new_leg.replica_id,
                       len(self.tracker.sent_ids))
        self.on_resume("resumed")
        self.leg.cancel()
        self.leg, self.resumes = new_leg, self.resumes + 1
        return True

    def _move_whole(self) -> bool:
        """The untouched request on another engine, for a stream that broke before any chunk."""
        new_leg = self.move_whole(self.leg) if self.resumes + self.moves < self.max_resumes else None
        if new_leg is None:
            self.on_resume("exhausted")
            return False
        logger.warning("%s replica %s lost before its first chunk; serving the request on %s replica %s",
                       self.leg.pool.name, self.leg.served_by or self.leg.replica_id, new_leg.pool.name,
                       new_leg.replica_id)
        self.leg.cancel()
        self.leg, self.moves = new_leg, self.moves + 1
        return True
