"""``InstantStubEngine``: a STUB engine that answers instantly, for the router-capacity benchmark ONLY.

It never runs a model. It speaks the engine replicas' protocol (engine/replica.py and
engine/server.py) so that the router (router/app.py, unchanged) cannot tell it from a real
pool, and answers as fast as Python can format strings. With it in place of the engines,
whatever limits throughput is the router's own overhead (HTTP, admission, selection, the
Ray handle calls, parsing every chunk for mid-stream resume) plus Ray's messaging, which is
what bench/router_capacity.py measures. Nothing else may use it: figures measured through
it say nothing about serving a model.

What it sends, per engine/server.py's ``Item`` formats:

* a streamed request: vLLM's SSE chunks byte for byte as vLLM 0.32's OpenAI server writes
  them (``model_dump_json(exclude_unset=True)``): the role chunk (with ``prompt_token_ids``
  when ``return_token_ids`` is set, which the router always sets for streams), one chunk per
  token with ``token_ids``, the last token's chunk carrying ``finish_reason: "length"``, the
  usage chunk when ``stream_options.include_usage`` is set, then ``data: [DONE]``;
* batched like ``EngineReplica.generate`` does: one list of items per Ray message, the first
  list starting with ``("meta", {...})``; ``tokens_per_message`` token chunks per message
  (default 1: what a real engine sends at low load, one decode step per message);
* a non-streamed request (the P/D prefill leg: ``max_tokens=1, stream=False``): one
  ``("json", body)`` whose body carries ``kv_transfer_params: {"stub": True}``;
* a P/D decode leg (``kv_transfer_params`` in the body): a ``("kv", {...})`` report of a
  successful zero-byte pull ahead of the first token, as a decode engine sends.

The chunk formatting is plain functions (``stub_messages``) so tests run it without Ray.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, AsyncIterator, Iterator, Optional

from pdserve.engine.direct_stream import StreamServer
from pdserve.engine.errors import error_body

STUB_NAME = "InstantStubEngine"
STUB_LABEL = f"{STUB_NAME} (STUB engine: answers instantly, runs no model)"

# Token pieces the stub "generates": (token id, text). Plain ASCII words, so a chunk needs no
# JSON escaping beyond the quotes; ids start above the tiny tokenizer's special tokens.
_WORDS = ("the model token prefill decode cache block transfer engine router replica request latency "
          "throughput goodput stream queue budget tenant priority cluster fallback link time first output "
          "input prompt answer question chat user assistant system hello world").split()
STUB_VOCAB: tuple[tuple[int, str], ...] = tuple((100 + i, " " + w) for i, w in enumerate(_WORDS))

# A P/D decode leg's KV pull, as a decode engine reports it (engine/stats.py transfer_of).
STUB_KV_PULL = {"ok": True, "seconds": 0.0, "bytes": 0}


def stub_token_ids(n: int) -> list[int]:
    """The token ids a stub stream of ``n`` tokens carries, in order."""
    return [STUB_VOCAB[i % len(STUB_VOCAB)][0] for i in range(n)]


def stub_text(n: int) -> str:
    return "".join(STUB_VOCAB[i % len(STUB_VOCAB)][1] for i in range(n))


@dataclass(frozen=True)
class StubSettings:
    # Token chunks per Ray message (a real engine: 1 at low load, more when the router lags).
    tokens_per_message: int = 1
    # Output length when the body sets neither max_tokens nor max_completion_tokens.
    default_max_tokens: int = 16
    # The model name in responses (vLLM answers with the served name).
    served_name: str = "tiny"
    # Pause between two messages of one stream; 0 only yields to the event loop so streams
    # interleave the way a real engine's steps do.
    message_interval_s: float = 0.0
    # What load() reports as the KV cache size (tokens): large, so the admission KV gate and
    # the degradation ladder always see a nearly empty cache.
    kv_capacity_tokens: int = 1 << 24

    def __post_init__(self):
        if self.tokens_per_message < 1:
            raise ValueError("tokens_per_message must be at least 1")
        if self.message_interval_s < 0:
            raise ValueError("message_interval_s must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# chunk formatting (plain functions: no Ray, no vLLM)


def _max_tokens(body: dict[str, Any], default: int) -> int:
    n = body.get("max_completion_tokens")
    if n is None:
        n = body.get("max_tokens")
    try:
        return max(1, int(n)) if n is not None else default
    except (TypeError, ValueError):
        return default


def _prompt_len(endpoint: str, body: dict[str, Any]) -> int:
    """A cheap stand-in for the prompt's token count (~4 characters a token); no tokenizer."""
    if endpoint == "completions":
        p = body.get("prompt")
        if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
            return len(p)
        text = p[0] if isinstance(p, list) and p else p
        return max(1, len(str(text or "")) // 4)
    chars = 0
    msgs = body.get("messages") or []
    for m in msgs:
        c = m.get("content") if isinstance(m, dict) else None
        chars += len(c) if isinstance(c, str) else len(json.dumps(c)) if c else 0
    return max(1, chars // 4 + 4 * len(msgs) + 2)


@lru_cache(maxsize=256)
def _prompt_ids_json(n: int) -> str:
    """A JSON list of ``n`` made-up prompt token ids (the router only needs their count and order)."""
    return "[" + ",".join(str(8 + (i * 37) % 1900) for i in range(n)) + "]"


@lru_cache(maxsize=1)
def _token_pieces() -> tuple[tuple[int, str], ...]:
    return tuple((tid, json.dumps(text)) for tid, text in STUB_VOCAB)


def _usage_json(prompt: int, completion: int) -> str:
    return (f'{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},"completion_tokens":{completion},'
            f'"prompt_tokens_details":{{"cached_tokens":0}}}}')


def _stream_events(endpoint: str, body: dict[str, Any], *, request_id: str, created: int,
                   settings: StubSettings) -> Iterator[tuple[str, str]]:
    """(kind, chunk) for every SSE chunk of a streamed response; kind is "head" (chat's role
    chunk), "token", "last" (the last token, with finish_reason) or "tail" (usage, [DONE])."""
    n = _max_tokens(body, settings.default_max_tokens)
    p = _prompt_len(endpoint, body)
    ids_on = bool(body.get("return_token_ids"))
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
    model = json.dumps(settings.served_name)
    pieces = _token_pieces()
    if endpoint == "chat":
        head = f'data: {{"id":"{request_id}","object":"chat.completion.chunk","created":{created},"model":{model},'
        prompt_ids = _prompt_ids_json(p) if ids_on else "null"
        yield "head", (head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                       f'"finish_reason":null}}],"prompt_token_ids":{prompt_ids},"prompt_text":null}}\n\n')
        for i in range(n):
            tid, text = pieces[i % len(pieces)]
            ids = f"[{tid}]" if ids_on else "null"
            if i < n - 1:
                yield "token", (head + f'"choices":[{{"index":0,"delta":{{"content":{text}}},"logprobs":null,'
                                       f'"finish_reason":null,"token_ids":{ids}}}]}}\n\n')
            else:
                yield "last", (head + f'"choices":[{{"index":0,"delta":{{"content":{text}}},"logprobs":null,'
                                      f'"finish_reason":"length","stop_reason":null,"token_ids":{ids}}}]}}\n\n')
    else:
        head = f'data: {{"id":"{request_id}","object":"text_completion","created":{created},"model":{model},'
        for i in range(n):
            tid, text = pieces[i % len(pieces)]
            ids = f"[{tid}]" if ids_on else "null"
            prompt_ids = _prompt_ids_json(p) if ids_on and i == 0 else "null"
            reason = '"length"' if i == n - 1 else "null"
            yield ("last" if i == n - 1 else "token"), (
                head + f'"choices":[{{"index":0,"text":{text},"logprobs":null,"finish_reason":{reason},'
                       f'"stop_reason":null,"prompt_token_ids":{prompt_ids},"token_ids":{ids}}}]}}\n\n')
    if include_usage:
        yield "tail", head + f'"choices":[],"usage":{_usage_json(p, n)}}}\n\n'
    yield "tail", "data: [DONE]\n\n"


def stream_chunks(endpoint: str, body: dict[str, Any], *, request_id: str, created: int,
                  settings: StubSettings = StubSettings()) -> Iterator[str]:
    """Every SSE chunk of a streamed response, in order, each ``"data: {...}\\n\\n"`` as vLLM writes it."""
    for _, chunk in _stream_events(endpoint, body, request_id=request_id, created=created, settings=settings):
        yield chunk


def json_response(endpoint: str, body: dict[str, Any], *, request_id: str, created: int, role: str,
                  settings: StubSettings = StubSettings()) -> dict[str, Any]:
    """A non-streamed response body as vLLM returns it; a prefill leg's carries kv_transfer_params."""
    n = _max_tokens(body, settings.default_max_tokens)
    p = _prompt_len(endpoint, body)
    kv_in = body.get("kv_transfer_params")
    wants_kv = role == "prefill" or (isinstance(kv_in, dict) and bool(kv_in.get("do_remote_decode")))
    usage = {"prompt_tokens": p, "total_tokens": p + n, "completion_tokens": n,
             "prompt_tokens_details": {"cached_tokens": 0}}
    text = stub_text(n)
    if endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                                          "audio": None, "function_call": None, "tool_calls": [], "reasoning": None},
                  "logprobs": None, "finish_reason": "length", "stop_reason": None, "token_ids": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                  "prompt_logprobs": None, "prompt_token_ids": None, "token_ids": None}
        obj = "text_completion"
    out = {"id": request_id, "object": obj, "created": created, "model": settings.served_name, "choices": [choice],
           "service_tier": None, "system_fingerprint": None, "usage": usage,
           "kv_transfer_params": {"stub": True} if wants_kv else None}
    if endpoint == "chat":
        out.update(prompt_logprobs=None, prompt_token_ids=None)
    return out


def stub_messages(endpoint: str, body: dict[str, Any], *, role: str, request_id: str, created: Optional[int] = None,
                  settings: StubSettings = StubSettings()) -> Iterator[list[tuple]]:
    """The lists of ``Item`` tuples one call sends, one list per Ray message, without the
    leading ``("meta", ...)`` item (the deployment adds it, as EngineReplica does)."""
    created = int(time.time()) if created is None else created
    if endpoint not in ("chat", "completions"):
        yield [("error", 404, error_body(404, f"unknown endpoint {endpoint!r}", "NotFoundError"))]
        return
    kv_in = body.get("kv_transfer_params")
    side = [("kv", dict(STUB_KV_PULL))] if role == "decode" and isinstance(kv_in, dict) else []
    if not body.get("stream"):
        yield side + [("json", json_response(endpoint, body, request_id=request_id, created=created, role=role,
                                             settings=settings))]
        return
    if not side:  # a stream accepted, ahead of the engine's first output (engine/server.py)
        yield [("head", {})]
    # The role chunk travels with the first token, and usage + [DONE] with the last one, as
    # vLLM yields them in the same engine step; otherwise tokens_per_message tokens a message.
    k = settings.tokens_per_message
    batch: list[tuple] = list(side)
    tokens = 0
    for kind, chunk in _stream_events(endpoint, body, request_id=request_id, created=created, settings=settings):
        batch.append(("sse", chunk))
        if kind == "token":
            tokens += 1
            if tokens == k:
                yield batch
                batch, tokens = [], 0
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------
# the Ray Serve deployment class (bound by bench/router_capacity.py)


class InstantStubEngine:
    """STUB engine replica: the methods the router calls on an engine pool (``generate``,
    ``load``, ``check_health``), answering instantly with vLLM-format output. Runs no model,
    pins no cores, holds no KV. For bench/router_capacity.py only."""

    stub = True

    def __init__(self, role: str, settings: Optional[dict[str, Any]] = None, replica_id: Optional[str] = None):
        if replica_id is None:
            from ray import serve

            ctx = serve.get_replica_context()
            replica_id = ctx.replica_id.unique_id
            rank = ctx.rank
            self.index = int(getattr(rank, "local_rank", rank if isinstance(rank, int) else 0))
        else:
            self.index = 0
        self.replica_id = replica_id
        self.role = role
        self.settings = StubSettings(**(settings or {}))
        self.running = 0
        self.requests_total = 0
        self._ids = itertools.count()
        self._tag = f"{os.getpid():x}{int(time.time() * 1000) % 0xFFFFFF:x}"
        self.streams: Optional[StreamServer] = None

    async def start_streams(self, host: str = "127.0.0.1") -> None:
        """Serve ``generate`` on a direct stream too, as EngineReplica does."""
        self.streams = StreamServer(self.generate, host, report=self.load)
        await self.streams.start()

    def _request_id(self, endpoint: str) -> str:
        return f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-stub-{self._tag}-{next(self._ids)}"

    async def generate(self, endpoint: str, body: dict[str, Any], replica: Optional[str] = None
                       ) -> AsyncIterator[list]:
        meta = ("meta", {"replica": self.replica_id, "role": self.role, "stub": STUB_NAME})
        interval = self.settings.message_interval_s
        self.running += 1
        self.requests_total += 1
        try:
            first = True
            for batch in stub_messages(endpoint, body, role=self.role, request_id=self._request_id(endpoint),
                                       settings=self.settings):
                if first:
                    batch.insert(0, meta)
                    first = False
                else:
                    await asyncio.sleep(interval)  # 0: let the other streams interleave
                yield batch
        finally:
            self.running -= 1

    def load(self, replica: Optional[str] = None) -> dict[str, Any]:
        """Healthy and idle, in engine/stats.py LoadReport's fields plus what EngineServer.load adds."""
        return {
            "running": self.running, "waiting": 0, "kv_cache_usage": 0.0, "preemptions_total": 0,
            "external_hit_tokens_total": 0, "external_query_tokens_total": 0, "kv_transfers_total": 0,
            "kv_transfer_bytes_total": 0, "kv_transfer_seconds_total": 0.0, "kv_transfer_failures_total": 0,
            "kv_expired_total": 0, "kv_checksum_failures_total": 0, "kv_failure_kinds": {},
            "steps_total": self.requests_total, "kv_capacity_tokens": self.settings.kv_capacity_tokens,
            "updated_at": time.time(), "role": self.role, "index": self.index, "cores": None, "kv_port": None,
            "pid": os.getpid(), "replica": self.replica_id, "stub": STUB_NAME,
            "stream": self.streams.address() if self.streams else None,
        }

    async def check_health(self) -> None:
        return None


class InstantStubReplica(InstantStubEngine):
    """The Ray Serve deployment of the STUB: ``InstantStubEngine`` with its direct stream
    server started, so the router reaches it the way it reaches a real engine replica."""

    async def __init__(self, role: str, settings: Optional[dict[str, Any]] = None) -> None:
        super().__init__(role, settings)
        from pdserve.engine.server import advertised_address

        await self.start_streams(advertised_address())
