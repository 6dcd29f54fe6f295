"""How the fidelity test (bench/fidelity.py) compares two answers to one request.

An answer is reduced to a canonical form, and two answers are equal when their forms are.
The reduction drops or masks only what must differ between two servers, each for its reason:

* ``id`` of a response or chunk (and each chunk of a stream carries the same one: checked),
  and a tool call's ``id``: random per request (``chatcmpl-<uuid>``, ``chatcmpl-tool-<uuid>``);
* ``created`` (and each chunk of a stream carries the same one: checked): the wall clock;
* ``system_fingerprint``: the serving build's (vLLM writes its version and a hash of its
  configuration there; a stream's is compared for its presence only);
* ``usage.prompt_tokens_details.cached_tokens`` and ``created_cache_tokens``: how much of the
  prompt the engine found in its prefix cache, and how much it added there, which depend on
  what that engine served before (their presence is compared);
* a stream's cut into chunks: vLLM's server merges the tokens of several engine steps into one
  chunk when its reader lags the engine (vllm/v1/engine/output_processor.py
  RequestOutputCollector), so chunk boundaries depend on timing. Compared instead: each
  choice's text, reasoning, tool calls, logprobs, token ids, roles, finish and stop reasons,
  whole and in order; the number of ``[DONE]`` events and that the stream ends with one; the
  set of chunk layouts (the keys of a chunk and of its choices) and the keys of deltas over
  the whole stream; the number of chat chunks that carry nothing (vLLM sends none; a
  completions chunk with empty text is a token inside a character, and their number depends
  on the cut too); the final usage, the last running usage and whether every chunk carries
  usage (a chunk's running usage depends on where it was cut);
* headers other than ``content-type`` (its media type only): timing and pdserve's own
  ``x-pdserve-*`` headers (checked separately, for the path a request took).

Everything else is compared exactly: status codes, every body field, logprob values to the
last bit, the error ``type``, ``param``, ``code`` and ``message``.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Optional

MASK = "<masked>"
# usage.prompt_tokens_details fields that count prefix-cache hits and fills: they depend on
# what the engine served before.
CACHE_DEPENDENT = ("cached_tokens", "created_cache_tokens")


@dataclass
class Answer:
    """One server's answer to one request, as it came back."""

    status: int
    headers: dict[str, str]
    body: Any = None  # the JSON body of a whole response (or of an error)
    events: Optional[list[Any]] = None  # a stream's events: parsed JSON, or "[DONE]", or raw text
    note: dict[str, Any] = field(default_factory=dict)  # what the path runner saw (resumed, cut after...)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "headers": self.headers, "body": self.body, "events": self.events,
                "note": self.note}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Answer":
        return cls(d["status"], d["headers"], d.get("body"), d.get("events"), d.get("note") or {})


def parse_sse(text: str) -> list[Any]:
    """The events of an SSE body: each ``data:`` payload parsed as JSON where it is JSON."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[6:] if line.startswith("data: ") else line[5:]
                         for line in block.split("\n") if line.startswith("data:"))
        if not data and not block.strip():
            continue
        if data == "[DONE]":
            events.append("[DONE]")
            continue
        try:
            events.append(json.loads(data))
        except ValueError:
            events.append({"raw": block})
    return events


def _mask_whole(body: Any) -> Any:
    if not isinstance(body, dict):
        return body
    out = copy.deepcopy(body)
    for key in ("id", "created", "system_fingerprint"):
        if key in out:
            out[key] = MASK
    usage = out.get("usage")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    for key in CACHE_DEPENDENT:
        if isinstance(details, dict) and key in details:
            details[key] = MASK
    for choice in out.get("choices") or []:
        message = choice.get("message") if isinstance(choice, dict) else None
        for call in (message or {}).get("tool_calls") or []:
            if isinstance(call, dict) and "id" in call:
                call["id"] = MASK
    return out


def _layout(chunk: dict[str, Any]) -> tuple:
    """Which keys a chunk and its choices carry. A delta's keys are not part of it: a token whose
    text is empty (a part of a multi-byte character) makes a chunk with an empty delta, or none
    when merged with the next one; the union of delta keys over the stream is compared instead."""
    choices = chunk.get("choices") or []
    return (tuple(sorted(chunk)), tuple(sorted({tuple(sorted(c)) for c in choices if isinstance(c, dict)})))


def _delta_keys(chunk: dict[str, Any]) -> set[str]:
    return {k for c in chunk.get("choices") or [] if isinstance(c, dict) and isinstance(c.get("delta"), dict)
            for k in c["delta"]}


def _extend(acc: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        return
    acc.setdefault(key, [])
    acc[key].extend(value if isinstance(value, list) else [value])


def _merge_logprobs(acc: dict[str, Any], lp: Any) -> None:
    if lp is None:
        return
    if not isinstance(lp, dict):
        acc.setdefault("logprobs_other", []).append(lp)
        return
    for key, value in lp.items():  # chat: content (a list); completions: tokens, token_logprobs, ...
        _extend(acc, "logprobs." + key, value if isinstance(value, list) else [value])


def _merge_tool_calls(acc: dict[str, Any], calls: list[Any]) -> None:
    tools = acc.setdefault("tool_calls", {})
    for call in calls:
        idx = call.get("index", 0)
        t = tools.setdefault(str(idx), {"id": None, "type": None, "name": "", "arguments": ""})
        if call.get("id") is not None:
            t["id"] = MASK
        if call.get("type") is not None:
            t["type"] = call["type"]
        fn = call.get("function") or {}
        t["name"] += fn.get("name") or ""
        t["arguments"] += fn.get("arguments") or ""


def _merge_choice(acc: dict[str, Any], choice: dict[str, Any]) -> None:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        role = delta.get("role")
        if role is not None and acc.get("roles", [None])[-1] != role:
            acc.setdefault("roles", []).append(role)
        for key in ("content", "reasoning", "reasoning_content", "refusal"):
            if delta.get(key) is not None:
                acc[key] = acc.get(key, "") + delta[key]
        if delta.get("tool_calls"):
            _merge_tool_calls(acc, delta["tool_calls"])
        other = {k: v for k, v in delta.items() if k not in ("role", "content", "reasoning", "reasoning_content",
                                                             "refusal", "tool_calls")}
        if other:
            acc.setdefault("delta_other", []).append(other)
    if choice.get("text") is not None:
        acc["text"] = acc.get("text", "") + choice["text"]
    _merge_logprobs(acc, choice.get("logprobs"))
    _extend(acc, "token_ids", choice.get("token_ids"))
    for key in ("prompt_token_ids", "prompt_logprobs"):
        if choice.get(key) is not None:
            acc.setdefault(key, []).append(choice[key])
    if choice.get("finish_reason") is not None:
        acc.setdefault("finish", []).append([choice["finish_reason"], choice.get("stop_reason")])
    elif choice.get("stop_reason") is not None:
        acc.setdefault("stop_reason_without_finish", []).append(choice["stop_reason"])


def _carries_nothing(chunk: dict[str, Any]) -> bool:
    if chunk.get("usage") or chunk.get("prompt_token_ids"):
        return False
    for c in chunk.get("choices") or []:
        delta = c.get("delta") or {}
        if any(v not in (None, "", []) for v in delta.values()) or c.get("text") or c.get("finish_reason") \
                or c.get("logprobs") or c.get("token_ids") or c.get("prompt_token_ids"):
            return False
    return True


def canonical_stream(events: list[Any]) -> dict[str, Any]:
    ids, created, objects, models, layouts, delta_keys = set(), set(), set(), set(), set(), set()
    choices: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {"empty_chunks": 0, "errors": [], "other": [], "usage": None,
                           "chunks_with_usage": 0, "chunks": 0, "top_prompt_token_ids": None}
    for ev in events:
        if ev == "[DONE]":
            out["done"] = out.get("done", 0) + 1
            continue
        if not isinstance(ev, dict) or "raw" in ev:
            out["other"].append(ev)
            continue
        if "error" in ev and "choices" not in ev:
            out["errors"].append(ev)
            continue
        out["chunks"] += 1
        ids.add(ev.get("id"))
        created.add(ev.get("created"))
        objects.add(ev.get("object"))
        models.add(ev.get("model"))
        layouts.add(_layout(ev))
        delta_keys |= _delta_keys(ev)
        if ev.get("system_fingerprint") is not None:
            out["system_fingerprint_set"] = True
        if ev.get("prompt_token_ids") is not None:
            out["top_prompt_token_ids"] = ev["prompt_token_ids"]
        if ev.get("usage") is not None:
            out["chunks_with_usage"] += 1
            if not ev.get("choices"):
                out["usage"] = _mask_whole({"usage": ev["usage"]})["usage"]
            else:
                out["last_running_usage"] = _mask_whole({"usage": ev["usage"]})["usage"]
        if _carries_nothing(ev):
            out["empty_chunks"] += 1
        for c in ev.get("choices") or []:
            _merge_choice(choices.setdefault(str(c.get("index")), {}), c)
    # A running usage is cut with its chunk; every chunk carrying one, and the last one, are compared.
    out["every_chunk_has_usage"] = out["chunks"] > 0 and out.pop("chunks_with_usage") == out["chunks"]
    out.pop("chunks")
    if "chat.completion.chunk" not in objects:
        # A completions token whose text is part of a character makes a chunk with empty text,
        # or none when merged with the next: their number depends on the cut.
        out.pop("empty_chunks")
    out.update(ends_with_done=bool(events) and events[-1] == "[DONE]", one_id=len(ids) <= 1, one_created=len(created) <= 1, objects=sorted(map(str, objects)),
               models=sorted(map(str, models)), layouts=sorted(layouts), delta_keys=sorted(delta_keys),
               choices=choices)
    for key in ("other", "errors"):
        out[key] = [_mask_whole(e) for e in out[key]]
    return out


def canonical(answer: Answer) -> dict[str, Any]:
    """The answer with only what must differ masked (see the module docstring)."""
    media = (answer.headers.get("content-type") or "").split(";")[0].strip()
    form: dict[str, Any] = {"status": answer.status, "media_type": media}
    if answer.events is not None:
        form["stream"] = canonical_stream(answer.events)
    else:
        form["body"] = _mask_whole(answer.body)
    return form


def differences(expected: Any, got: Any, where: str = "", limit: int = 8) -> list[str]:
    """Where two canonical forms differ, as short 'path: expected != got' lines."""
    out: list[str] = []
    _diff(expected, got, where, out, limit)
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 160 else s[:157] + "..."


def _diff(a: Any, b: Any, where: str, out: list[str], limit: int) -> None:
    if len(out) >= limit:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in b:
                out.append(f"{where}.{k}: only in vLLM's answer ({_short(a[k])})")
            elif k not in a:
                out.append(f"{where}.{k}: only in pdserve's answer ({_short(b[k])})")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out, limit)
            if len(out) >= limit:
                return
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out, limit)
    elif a != b or type(a) is not type(b) and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))):
        out.append(f"{where or '.'}: vLLM {_short(a)} != pdserve {_short(b)}")
