"""Mid-stream resume: when the engine serving a stream dies, continue it on another engine.

The router asks a streamed request for token ids (``return_token_ids``: router/intake.py
``wants_resume_ids``), so it knows the prompt's ids (first chunk) and every id it has sent;
a client that did not ask for them never sees them (``hide_token_ids``). The continuation is a
``/v1/completions`` call on a healthy engine whose prompt is those ids: a full prefill of
prompt plus sent tokens, then decoding goes on where it stopped.

Exact for greedy decoding only. Random sampling (seeded or not) continues with a fresh
sampler: vLLM does not expose a request's generator state, and the seed, passed on again,
restarts its random stream from the beginning, so a seeded request's tokens after a resume
are a valid sample but not those of an unbroken run with that seed.
Its chunks are rewritten into the original stream's format, id and model, so the client
sees one continuous stream with no duplicated or missing tokens.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

# Sampling and output settings carried over to the continuation; everything else is chat- or
# client-specific and either meaningless for a token prompt or already applied.
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos", "stop", "stop_token_ids",
                  "include_stop_str_in_output", "presence_penalty", "frequency_penalty", "repetition_penalty",
                  "min_tokens", "logit_bias", "allowed_token_ids", "bad_words", "skip_special_tokens",
                  "spaces_between_special_tokens")

# vLLM's /v1/completions default max_tokens (CompletionRequest in vllm 0.32.0)
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_IDS_KEY = '"token_ids":['

# The tail of a token-id list's key: at the top of a chunk (chat's prompt_token_ids) or in
# a choice (token_ids, completions' prompt_token_ids). Inside a JSON string every quote is
# escaped, so an unescaped ``"token_ids":[`` can only be a key.
_IDS_TAIL = 'token_ids":['
# A chat chunk vLLM sends only because token ids were asked for: nothing in its delta, no
# logprobs, no finish (chat_completion/serving.py skips it when return_token_ids is off).
_IDS_ONLY_CHAT_CHUNK = '"delta":{},"logprobs":null,"finish_reason":null'


_TEXT_KEYS = ('"content":"', '"text":"')
_DECODER = json.JSONDecoder()


def _text_of(data: str) -> str:
    """The text of a one-choice chunk (chat content or completions text), read without parsing
    the rest of it."""
    for key in _TEXT_KEYS:
        at = data.find(key)
        if at >= 0:
            return _DECODER.raw_decode(data, at + len(key) - 1)[0]
    return ""


def hide_token_ids(text: str) -> str:
    """SSE text as vLLM writes it when ``return_token_ids`` is off, from text written with it
    on: every ``token_ids`` / ``prompt_token_ids`` list is ``null`` again (vLLM sets those
    fields to None, which its ``exclude_unset`` dump still writes), and the chat chunks sent
    only for their ids are dropped. No JSON parse and no regular expression: string finds
    over text that has the key (about a third of a regex pass), and a split into events only
    for the rare chunk with an empty delta. The text itself when there is nothing to hide."""
    at = text.find(_IDS_TAIL)
    if at < 0:
        return text
    parts, last = [], 0
    while at >= 0:
        start = at + len(_IDS_TAIL)
        end = text.find("]", start)
        if end < 0:
            break
        if text[at - 1] == '"' or text.endswith('"prompt_', 0, at):  # not logprob_token_ids or the like
            parts.append(text[last:start - 1])
            parts.append("null")
            last = end + 1
        at = text.find(_IDS_TAIL, end + 1)
    parts.append(text[last:])
    text = "".join(parts)
    if _IDS_ONLY_CHAT_CHUNK in text:
        text = "".join(e + "\n\n" for e in text.split("\n\n") if e and _IDS_ONLY_CHAT_CHUNK not in e)
    return text


class StreamTracker:
    """Reads the SSE events the client is sent and remembers what a continuation needs."""

    def __init__(self, endpoint: str, track_text: bool = False):
        self.endpoint = endpoint
        self.prompt_ids: Optional[list[int]] = None
        self.sent_ids: list[int] = []
        # The text sent, kept where vLLM may hold text back (a stream with stop strings).
        self.sent_text: Optional[list[str]] = [] if track_text else None
        self.held_back = ""  # text of sent tokens the client has not had yet, sent ahead of the continuation's
        self.head: dict[str, Any] = {}
        self.done = False
        self.finished = False
        self.resumed_at = 0  # tokens sent before the current continuation

    def observe(self, event: str) -> None:
        for line in event.splitlines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                self.done = True
                continue
            if self.head and self._observe_token_chunk(data):
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if not self.head and "id" in chunk:
                self.head = {k: chunk.get(k) for k in ("id", "created", "model")}
            if chunk.get("prompt_token_ids"):
                self.prompt_ids = list(chunk["prompt_token_ids"])
            for choice in chunk.get("choices") or []:
                # completions chunks carry the prompt ids per choice, chat chunks at the top
                if self.prompt_ids is None and choice.get("prompt_token_ids"):
                    self.prompt_ids = list(choice["prompt_token_ids"])
                self.sent_ids.extend(choice.get("token_ids") or [])
                if self.sent_text is not None:
                    self.sent_text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                if choice.get("finish_reason"):
                    self.finished = True

    def _observe_token_chunk(self, data: str) -> bool:
        """The common chunk (one choice, one delta, no finish) read without a JSON parse,
        which was a tenth of the router's CPU. Inside a JSON string every quote is escaped,
        so an unescaped ``"token_ids":[`` can only be the key. Anything else: False, and
        the caller parses the chunk in full."""
        at = data.find(_IDS_KEY)
        if at < 0 or data.find(_IDS_KEY, at + 1) >= 0 or '"finish_reason":"' in data or "prompt_token_ids" in data:
            return False
        start = at + len(_IDS_KEY)
        end = data.find("]", start)
        if end < 0:
            return False
        inner = data[start:end]
        try:
            ids = [int(t) for t in inner.split(",")] if inner.strip() else []
        except ValueError:
            return False
        self.sent_ids.extend(ids)
        if self.sent_text is not None:
            self.sent_text.append(_text_of(data))
        return True

    def recover_held_back(self, detokenize: Optional[Callable[[list[int]], str]]) -> None:
        """vLLM holds back the end of a stream's text while it may be the start of a stop string:
        the tokens' ids went out, their text not yet, and a continuation starts after them. That
        text (the sent tokens' text, ``detokenize(ids)``, beyond the text sent) goes out ahead of
        the continuation's own. A stop string that would span it and the continuation's first
        text is not found."""
        if self.sent_text is None or detokenize is None:
            return
        sent = "".join(self.sent_text)
        full = detokenize(self.sent_ids).rstrip("\ufffd")  # a character still incomplete comes with the next token
        self.held_back = full[len(sent):] if full.startswith(sent) else ""

    def can_resume(self, body: dict[str, Any]) -> bool:
        """Whether a continuation can go on exactly where the stream stopped. Never for a
        stream of several choices (``n`` other than 1, or a /v1/completions prompt list):
        their chunks interleave, each choice would need its own continuation and some may
        have finished, so such a stream is not resumed and fails as it did before resume
        existed (an error event, then [DONE]). Nor for a stream whose engine was not asked
        for token ids (``return_token_ids``): an echo stream, whose prompt ids come back
        without the ids it sent."""
        prompt = body.get("prompt")
        several_prompts = isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int)
        return (self.prompt_ids is not None and not self.finished and (body.get("n") or 1) == 1
                and not several_prompts and bool(body.get("return_token_ids")))

    def continuation(self, body: dict[str, Any], served_name: str,
                     max_model_len: Optional[int] = None) -> dict[str, Any]:
        """The /v1/completions body that goes on where the stream stopped: the same sampling,
        and the client's token limits less what it was already sent. A request without a limit
        ends where vLLM would have ended it: 16 tokens on /v1/completions, the end of the context
        (``max_model_len``) on chat; the continuation, itself a completions call, is given that
        limit explicitly (completions would otherwise stop after 16)."""
        out = {k: body[k] for k in _SAMPLING_KEYS if k in body}
        sent = len(self.sent_ids)
        prompt = self.prompt_ids + self.sent_ids
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit is None and self.endpoint == "completions":
            limit = _COMPLETIONS_DEFAULT_MAX_TOKENS
        if limit is not None:
            out["max_tokens"] = max(1, int(limit) - sent)
        elif max_model_len is not None:
            out["max_tokens"] = max(1, max_model_len - len(prompt))
        if body.get("min_tokens"):
            out["min_tokens"] = max(0, int(body["min_tokens"]) - sent)
        options = body.get("stream_options") or {}
        if options.get("include_usage"):  # the client's usage, rewritten by rewrite() to count the whole stream
            out["stream_options"] = {"include_usage": True,
                                     "continuous_usage_stats": bool(options.get("continuous_usage_stats"))}
        out.update(model=served_name, prompt=prompt, stream=True, return_token_ids=True)
        self.resumed_at = sent
        return out

    def rewrite(self, event: str) -> str:
        """A continuation (completions) event in the original stream's format: its id, model and
        object, each chunk laid out as vLLM lays out one of the original endpoint's chunks, and
        usage counting the whole stream (the original prompt; every token sent)."""
        out = []
        for line in event.splitlines():
            if line == "data: [DONE]":
                out.append(line)
                continue
            if not line.startswith("data: "):
                continue
            try:
                chunk = json.loads(line[6:])
            except ValueError:
                continue
            rewritten = self._rewrite_chunk(chunk)
            if rewritten is not None:
                # compact, as vLLM writes its chunks (and as hide_token_ids reads them)
                out.append("data: " + json.dumps(rewritten, separators=(",", ":")))
        return "".join(line + "\n\n" for line in out)

    def _rewrite_chunk(self, chunk: dict[str, Any]) -> Optional[dict[str, Any]]:
        choices = [self._rewrite_choice(c) for c in chunk.get("choices") or []
                   if c.get("text") or c.get("token_ids") or c.get("finish_reason")]
        usage = chunk.get("usage")
        if not choices and usage is None:
            return None
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        out: dict[str, Any] = {**self.head, "object": obj, "choices": choices}
        if usage is not None:
            out["usage"] = self._usage(usage, running=bool(chunk.get("choices")))
        if "system_fingerprint" in chunk:  # vLLM's last chunk carries it
            out["system_fingerprint"] = chunk["system_fingerprint"]
        return out

    def _rewrite_choice(self, c: dict[str, Any]) -> dict[str, Any]:
        text, self.held_back = self.held_back + (c.get("text") or ""), ""
        if self.endpoint != "chat":  # already a completions choice: the prompt ids went out in the first chunk
            return {**c, "index": 0, "text": text, "prompt_token_ids": None}
        reason = c.get("finish_reason")
        choice = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": reason}
        if reason is not None:  # vLLM's chat chunks carry stop_reason with the finish only
            choice["stop_reason"] = c.get("stop_reason")
        choice["token_ids"] = c.get("token_ids")
        return choice

    def _usage(self, usage: dict[str, Any], running: bool) -> dict[str, Any]:
        """The continuation's usage as the whole stream's: the original prompt, every token sent.
        The prompt's cache counts are the continuation's (its prefill of prompt and tokens sent),
        within the original prompt; a completions continuation reports no cache fills."""
        prompt = len(self.prompt_ids or [])
        done = self.resumed_at + int(usage.get("completion_tokens") or 0)
        out = dict(usage, prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            out["prompt_tokens_details"] = dict(details, cached_tokens=min(int(details.get("cached_tokens") or 0),
                                                                            prompt))
        if self.endpoint == "chat":  # vLLM's chat usage: details of the completion while running, of the prompt at the end
            if running:
                out.setdefault("completion_tokens_details", None)
            else:
                out.setdefault("prompt_tokens_details", {"cached_tokens": 0})
                out["prompt_tokens_details"].setdefault("created_cache_tokens", 0)
        return out


def error_event(message: str) -> str:
    body = {"error": {"message": message, "type": "ServiceUnavailableError", "param": None, "code": 503}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
