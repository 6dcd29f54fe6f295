"""Multi-turn chat sessions on the load client: conversations whose history grows each turn.

Sessions start at open-loop arrival times (Poisson, or gamma with ``burstiness``, at the session
rate); inside a session the turns are closed-loop, as a person chats: turn i + 1 goes out only
after answer i has streamed in full (data: [DONE]) and the session's think time has passed,
and it carries the whole conversation so far: the shared system prompt, every user turn and
the model's own answers as it streamed them. A turn that fails ends its session (there is no
answer to carry on from); the turns it did not send are counted, not sent.

Each turn is one loadgen.send_request record (bench/stats.py's RequestOutput) with its session
and turn, the prompt tokens the server counted and the ones it found cached
(``usage.prompt_tokens_details.cached_tokens``: streamed requests ask for usage; vLLM's server
reports the details only with --enable-prompt-tokens-details, which pdserve's engines set).
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any, Iterable, Optional

from pdserve.bench.loadgen import (ENDPOINTS, LoadSpec, arrival_offsets, open_session, request_headers,
                                   result_head, send_request)
from pdserve.bench.stats import DEFAULT_PERCENTILES, RequestOutput, compute_metrics
from pdserve.bench.workloads import ChatSession


def turn_body(model: str, messages: list[dict[str, str]], answer_len: int) -> dict[str, Any]:
    return {"model": model, "messages": messages, "max_tokens": answer_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def run_session(http, url: str, model: str, index: int, s: ChatSession, *, t_origin: float,
                      headers: dict[str, str], on_turn=None) -> list[RequestOutput]:
    """One conversation, turn after turn; its records (fewer than its turns if one failed)."""
    messages = [{"role": "system", "content": s.system_prompt}]
    outputs: list[RequestOutput] = []
    for turn, user in enumerate(s.user_turns):
        if turn:
            await asyncio.sleep(s.think_times_s[turn - 1])
        messages.append({"role": "user", "content": user})
        body = json.dumps(turn_body(model, messages, s.answer_len)).encode()
        out = await send_request(http, url, body, headers=headers, t_origin=t_origin, keep_text=True)
        out.session, out.turn = index, turn
        outputs.append(out)
        if on_turn is not None:
            on_turn()
        if not out.success:
            break
        messages.append({"role": "assistant", "content": out.generated_text})
    return outputs


async def run_sessions(base_url: str, model: str, sessions: list[ChatSession], load: LoadSpec, *, seed: int = 0,
                       api_key: Optional[str] = None, timeout_s: float = 600.0, progress: Optional[str] = None,
                       t_origin: Optional[float] = None) -> tuple[list[RequestOutput], float]:
    """Start ``sessions`` at ``load``'s arrival times (``request_rate``: sessions per second; at
    most ``max_concurrency`` sessions at once) and run each to its end; every turn's record, by
    session then turn, and the run's duration."""
    url = base_url.rstrip("/") + ENDPOINTS["chat"]
    offsets = arrival_offsets(len(sessions), load.request_rate, load.burstiness, seed)
    sem = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    headers = request_headers(api_key)
    bar = None
    if progress is not None:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(s.user_turns) for s in sessions), desc=progress, unit="turn", leave=False)

    async def one(i: int, s: ChatSession) -> list[RequestOutput]:
        kw = dict(t_origin=t0, headers=headers, on_turn=bar.update if bar is not None else None)
        if sem is None:
            return await run_session(http, url, model, i, s, **kw)
        async with sem:
            return await run_session(http, url, model, i, s, **kw)

    async with open_session(timeout_s=timeout_s) as http:
        t0 = time.perf_counter() if t_origin is None else t_origin
        tasks = []
        for i, (s, at) in enumerate(zip(sessions, offsets)):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, s)))
        per_session = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return [r for outs in per_session for r in outs], duration


def run_session_benchmark(base_url: str, model: str, sessions: list[ChatSession], load: LoadSpec, *, seed: int = 0,
                          percentiles: Iterable[float] = DEFAULT_PERCENTILES,
                          slos_ms: Optional[dict[str, float]] = None, api_key: Optional[str] = None,
                          timeout_s: float = 600.0, progress: bool = True) -> dict[str, Any]:
    """One run of ``sessions`` at ``load`` (its rate in sessions per second); the result dict.

    ``request_rate`` is the offered request rate, the session rate times the turns per session:
    every session sends all its turns unless one fails, so that is the request rate the run
    offers over time, though its turns come closed-loop. ``session_rate`` is the rate given."""
    turns = max((len(s.user_turns) for s in sessions), default=0)
    desc = f"sessions {load.request_rate:g}/s" + (f" conc {load.max_concurrency}" if load.max_concurrency else "")
    outputs, duration = asyncio.run(run_sessions(base_url, model, sessions, load, seed=seed, api_key=api_key,
                                                 timeout_s=timeout_s, progress=desc if progress else None))
    result = result_head(base_url, "chat", model, load.request_rate * turns, load, seed)
    rate = load.request_rate
    result.update({"session_rate": rate if math.isfinite(rate) else "inf", "num_sessions": len(sessions),
                   "turns_per_session": turns})
    result.update(session_counts(outputs, sessions))
    result.update(compute_metrics(outputs, duration, percentiles, slos_ms))
    return result


def session_counts(outputs: list[RequestOutput], sessions: list[ChatSession]) -> dict[str, int]:
    """Sessions that got every answer, and turns never sent because an earlier one failed."""
    done = {i: 0 for i in range(len(sessions))}
    for r in outputs:
        if r.success and r.session is not None:
            done[r.session] += 1
    complete = sum(n == len(s.user_turns) for n, s in zip(done.values(), sessions))
    return {"sessions_completed": complete,
            "turns_not_sent": sum(len(s.user_turns) for s in sessions) - len(outputs)}
