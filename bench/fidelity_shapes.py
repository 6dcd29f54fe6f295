"""The request shapes of the fidelity test (bench/fidelity.py), as data.

Each shape is one request body sent alike to vLLM's own OpenAI server and to pdserve. Names
end in ``.json`` (a whole response) or ``.sse`` (streamed). ``bad`` shapes are inputs vLLM's
server refuses: their status and error are compared, not a completion.

A shape runs on every path (bench/fidelity.py ``PATH_KINDS``) except those its ``skip`` names,
each with the reason. Mid-stream resume is tried only on ``resume`` shapes: streamed, greedy,
one choice, long enough to be cut after their first tokens; ``Shape.resume_exclusion`` gives
every other shape's reason (``NO_RESUME``).

The built-in tiny model has random (seeded) weights over a 821-token vocabulary, so its
output is gibberish but fixed: the stop strings and stop token ids below are ones its greedy
output for these prompts does contain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

MODEL = "tiny"
OOV_TOKEN = 5000  # beyond the tiny model's vocabulary

# Why a kind of shape is not resumed mid-stream (the resume path skips it, with this reason).
NO_RESUME = {
    "sampled": "random sampling goes on with a fresh sampler after a resume (vLLM exposes no generator "
               "state; the seed restarts its stream), so only greedy streams are comparable",
    "several": "streams of several choices (n > 1, prompt lists) are not resumed (decode/resume.py "
               "StreamTracker.can_resume)",
    "echo": "a /v1/completions echo stream is not resumed: the router does not ask it for token ids",
    "logprobs": "a continuation is a /v1/completions call; its logprobs are not rewritten into the "
                "chat stream's format, so a resumed stream carries none after the cut",
    "penalties": "presence and frequency penalties count output tokens only; the tokens sent before "
                 "the cut are the continuation's prompt, so they are no longer penalised",
    "structured": "structured output (response_format, required or named tool choice) would restart "
                  "its grammar in the continuation",
    "tools": "the continuation has no tools, so the tool-call parser does not see its text",
    "short": "too short to be cut reliably after its first token (the resume shapes ask for 40 tokens)",
    "not streamed": "a whole response has no stream to cut",
    "refused": "refused before any token",
    "fragments": "the tiny model answers this prompt with byte fragments that never form a character; vLLM's "
                 "detokenizer, started anew on a prompt that ends in such fragments, writes text of the prompt "
                 "into the continuation's first chunk",
}


@dataclass(frozen=True)
class Shape:
    name: str
    endpoint: str  # "chat" or "completions"
    body: dict[str, Any]
    bad: bool = False
    raw: Optional[str] = None  # sent as the body instead of ``body`` (a body that is not a JSON object)
    content_type: str = "application/json"
    resume: bool = False  # may be cut mid-stream and resumed (greedy, one choice, long)
    skip: dict[str, str] = field(default_factory=dict)  # path -> why this shape does not run there

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def resume_exclusion(self) -> Optional[str]:
        """Why this shape is not cut and resumed on the resume path (None: it is)."""
        if "resume" in self.skip:
            return self.skip["resume"]
        b = self.body
        checks = [("refused", self.bad), ("not streamed", not self.stream), ("several", self.whole),
                  ("sampled", b.get("temperature") != 0), ("echo", self.endpoint == "completions" and b.get("echo")),
                  ("logprobs", b.get("logprobs") or b.get("top_logprobs")),
                  ("penalties", b.get("presence_penalty") or b.get("frequency_penalty")),
                  ("structured", b.get("response_format") or b.get("tool_choice") not in (None, "auto", "none")),
                  ("tools", b.get("tools")), ("short", not self.resume)]
        return next((NO_RESUME[kind] for kind, excluded in checks if excluded), None)

    @property
    def whole(self) -> bool:
        """Served whole on one engine even by a P/D cluster (router/protocol.py serves_whole)."""
        n = self.body.get("n")
        prompt = self.body.get("prompt")
        several = isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int)
        return (n is not None and n != 1) or (self.endpoint == "completions" and several)


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


MISSING = object()  # a shape without the field at all


def chat(name: str, text: str = "Explain how the cache serves a request", *, messages=None, bad=False,
         resume=False, skip=None, **body) -> Shape:
    b = {"model": MODEL, "messages": _user(text) if messages is None else messages, **body}
    if messages is MISSING:
        del b["messages"]
    return Shape(name, "chat", b, bad=bad, resume=resume, skip=skip or {})


def comp(name: str, prompt: Any = "The engine streams the first token of", *, bad=False, resume=False, skip=None,
         **body) -> Shape:
    b = {"model": MODEL, "prompt": prompt, **body}
    if prompt is MISSING:
        del b["prompt"]
    return Shape(name, "completions", b, bad=bad, resume=resume, skip=skip or {})


def both(make, name: str, *args, resume=False, **kwargs) -> list[Shape]:
    """The shape as a whole response and streamed (only the streamed one may be resumed)."""
    return [make(name + ".json", *args, **kwargs), make(name + ".sse", *args, stream=True, resume=resume, **kwargs)]


GREEDY = {"temperature": 0}
SEEDED = {"temperature": 0.9, "top_p": 0.8, "top_k": 20, "seed": 1234}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "count": {"type": "integer"}},
          "required": ["answer", "count"]}
SYSTEM_DIALOGUE = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is prefill?"},
    {"role": "assistant", "content": "The prompt pass."},
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "And decode?"},
]
PARTS = [{"role": "user", "content": [{"type": "text", "text": "First part about the cache."},
                                      {"type": "text", "text": "Second part about the router."}]}]
CONTINUE = [{"role": "user", "content": "Finish my sentence"}, {"role": "assistant", "content": "The decode engine"}]

# In the tiny model's greedy output for the default prompts (see the module docstring): chat
# answers " tenantor tenantor ..." (ids 555, 279), completions " systemUnd systemUnd ..." (575, 792).
# With min_tokens the stop comes late, after the resume path's cut.
CHAT_STOP_TEXT, CHAT_STOP_TOKEN = "or", 279
COMP_STOP_TEXT, COMP_STOP_TOKEN = "Und", 792


def _chat_shapes() -> list[Shape]:
    s: list[Shape] = []
    s += both(chat, "chat.greedy", max_tokens=48, resume=True, **GREEDY)
    s += both(chat, "chat.min_tokens", max_tokens=40, min_tokens=30, resume=True, **GREEDY)
    s += both(chat, "chat.max_completion_tokens", max_completion_tokens=40, resume=True, **GREEDY)
    s += both(chat, "chat.ignore_eos", max_tokens=40, ignore_eos=True, resume=True, **GREEDY)
    s += both(chat, "chat.seeded", max_tokens=12, skip={"resume": NO_RESUME["sampled"]}, **SEEDED)
    s += both(chat, "chat.n2_seeded", max_tokens=8, n=2, temperature=0.8, seed=7)
    s.append(chat("bad.chat.n3_greedy.json", max_tokens=6, n=3, bad=True, **GREEDY))
    s.append(chat("chat.n2_logprobs.sse", max_tokens=6, n=2, logprobs=True, top_logprobs=2, stream=True,
                  temperature=0.7, seed=11))
    s += both(chat, "chat.logprobs", max_tokens=8, logprobs=True, top_logprobs=3, **GREEDY)
    s.append(chat("chat.logprobs_top0.json", max_tokens=6, logprobs=True, **GREEDY))
    s.append(chat("chat.prompt_logprobs.json", max_tokens=4, prompt_logprobs=2, **GREEDY))
    s.append(chat("bad.chat.prompt_logprobs.sse", max_tokens=4, prompt_logprobs=2, stream=True, bad=True, **GREEDY))
    s += both(chat, "chat.stop_string", max_tokens=40, min_tokens=16, stop=[CHAT_STOP_TEXT], resume=True, **GREEDY)
    s.append(chat("chat.stop_string_early.json", max_tokens=40, stop=[CHAT_STOP_TEXT, "never"], **GREEDY))
    s += both(chat, "chat.stop_string_included", max_tokens=40, min_tokens=16, stop=CHAT_STOP_TEXT,
              include_stop_str_in_output=True, resume=True, **GREEDY)
    s += both(chat, "chat.stop_token_ids", max_tokens=40, min_tokens=16, stop_token_ids=[CHAT_STOP_TOKEN], resume=True,
              **GREEDY)
    s += both(chat, "chat.penalties", max_tokens=16, presence_penalty=0.5, frequency_penalty=0.7,
              repetition_penalty=1.2, **GREEDY)
    s += both(chat, "chat.logit_bias", max_tokens=24, logit_bias={"512": 5.0, "300": -100}, resume=True, **GREEDY)
    s += both(chat, "chat.json_object", max_tokens=24, response_format={"type": "json_object"}, **GREEDY)
    s += both(chat, "chat.json_schema", max_tokens=32, **GREEDY,
              response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}})
    s += both(chat, "chat.tools_auto", max_tokens=16, tools=TOOLS, tool_choice="auto", **GREEDY)
    s += both(chat, "chat.tools_required", max_tokens=48, tools=TOOLS, tool_choice="required", **GREEDY)
    s += both(chat, "chat.tools_named", max_tokens=32, tools=TOOLS, **GREEDY,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    s.append(chat("chat.tools_none.json", max_tokens=8, tools=TOOLS, tool_choice="none", **GREEDY))
    s.append(chat("chat.template_kwargs.json", max_tokens=8, chat_template_kwargs={"flavour": "terse"}, **GREEDY))
    s.append(chat("chat.no_generation_prompt.json", max_tokens=8, add_generation_prompt=False, **GREEDY))
    s += both(chat, "chat.continue_final", messages=CONTINUE, max_tokens=32, add_generation_prompt=False,
              continue_final_message=True, resume=True, **GREEDY)
    s += both(chat, "chat.content_parts", messages=PARTS, max_tokens=32, resume=True, **GREEDY)
    s += both(chat, "chat.system_dialogue", messages=SYSTEM_DIALOGUE, max_tokens=32, resume=True, **GREEDY)
    s.append(chat("chat.developer_role.json", max_tokens=8, **GREEDY,
                  messages=[{"role": "developer", "content": "Be brief."}, *_user("Hello")]))
    s += both(chat, "chat.echo", max_tokens=40, echo=True, resume=True, **GREEDY)
    s.append(chat("chat.include_usage.sse", max_tokens=40, stream=True, stream_options={"include_usage": True},
                  resume=True, **GREEDY))
    s.append(chat("chat.continuous_usage.sse", max_tokens=40, stream=True, resume=True, **GREEDY,
                  stream_options={"include_usage": True, "continuous_usage_stats": True}))
    s.append(chat("chat.user.json", max_tokens=8, user="client-user-42", **GREEDY))
    s += both(chat, "chat.return_token_ids", max_tokens=40, return_token_ids=True, resume=True, **GREEDY)
    s.append(chat("chat.default_temperature_seeded.json", max_tokens=8, seed=99))
    s.append(chat("chat.long_prompt_capped.json", "cache block " * 960, max_tokens=1000, **GREEDY))
    s.append(chat("chat.truncate_prompt_tokens.json", "cache block " * 1100, max_tokens=4, truncate_prompt_tokens=64,
                  **GREEDY))
    s.append(chat("chat.bad_words.json", max_tokens=8, bad_words=["the"], **GREEDY))
    s.append(chat("chat.allowed_token_ids.json", max_tokens=6, allowed_token_ids=[300, 512, 712], **GREEDY))
    s.append(chat("chat.allowed_token_ids.sse", max_tokens=40, allowed_token_ids=[300, 512, 712], stream=True,
                  resume=True, **GREEDY))
    s.append(chat("chat.bad_words.sse", max_tokens=40, bad_words=[" tenant"], stream=True, resume=True, **GREEDY))
    return s


def _completion_shapes() -> list[Shape]:
    s: list[Shape] = []
    s += both(comp, "comp.greedy", max_tokens=48, resume=True, **GREEDY)
    s.append(comp("comp.default_max_tokens.json", **GREEDY))
    s.append(comp("comp.default_max_tokens.sse", stream=True, **GREEDY))
    s += both(comp, "comp.echo", max_tokens=6, echo=True, **GREEDY)
    s.append(comp("comp.echo_logprobs.json", max_tokens=4, echo=True, logprobs=2, **GREEDY))
    s += both(comp, "comp.prompt_list", ["The router picks", "A decode engine pulls"], max_tokens=6, **GREEDY)
    s += both(comp, "comp.token_prompt", [712, 512, 300, 100], max_tokens=40, **GREEDY,
              skip={"resume": NO_RESUME["fragments"]})
    s += both(comp, "comp.token_prompt_list", [[712, 512], [300, 100, 200]], max_tokens=6, **GREEDY)
    s.append(comp("comp.one_prompt_list.json", ["The router picks a pair"], max_tokens=6, **GREEDY))
    s += both(comp, "comp.logprobs", max_tokens=6, logprobs=3, **GREEDY)
    s.append(comp("comp.prompt_logprobs.json", max_tokens=4, prompt_logprobs=1, **GREEDY))
    s += both(comp, "comp.seeded", max_tokens=12, skip={"resume": NO_RESUME["sampled"]}, **SEEDED)
    s += both(comp, "comp.n2_seeded", max_tokens=8, n=2, temperature=0.8, seed=5)
    s += both(comp, "comp.stop_string", max_tokens=40, min_tokens=16, stop=[COMP_STOP_TEXT], resume=True, **GREEDY)
    s += both(comp, "comp.stop_string_included", max_tokens=40, min_tokens=16, stop=[COMP_STOP_TEXT],
              include_stop_str_in_output=True, resume=True, **GREEDY)
    s += both(comp, "comp.stop_token_ids", max_tokens=40, min_tokens=16, stop_token_ids=[COMP_STOP_TOKEN],
              resume=True, **GREEDY)
    s += both(comp, "comp.min_tokens", max_tokens=40, min_tokens=30, resume=True, **GREEDY)
    s.append(comp("comp.ignore_eos.json", max_tokens=24, ignore_eos=True, **GREEDY))
    s.append(comp("comp.penalties.json", max_tokens=16, presence_penalty=1.0, repetition_penalty=1.3, **GREEDY))
    s.append(comp("comp.logit_bias.json", max_tokens=8, logit_bias={"300": 3.0}, **GREEDY))
    s.append(comp("comp.json_object.json", max_tokens=16, response_format={"type": "json_object"}, **GREEDY))
    s.append(comp("comp.usage.sse", max_tokens=40, stream=True, resume=True, **GREEDY,
                  stream_options={"include_usage": True, "continuous_usage_stats": True}))
    s.append(comp("comp.user.json", max_tokens=6, user="client-user-42", **GREEDY))
    s += both(comp, "comp.return_token_ids", max_tokens=40, return_token_ids=True, resume=True, **GREEDY)
    return s


def _bad_shapes() -> list[Shape]:
    b = {"bad": True}
    long_text = "cache block " * 1100  # over the 2048-token context
    return [
        chat("bad.chat.negative_temperature.json", temperature=-1, max_tokens=4, **b),
        chat("bad.chat.top_p_above_one.json", top_p=1.5, max_tokens=4, **b),
        chat("bad.chat.n_zero.json", n=0, max_tokens=4, **b),
        chat("bad.chat.n_zero.sse", n=0, max_tokens=4, stream=True, **b),
        chat("bad.chat.max_tokens_zero.json", max_tokens=0, **b),
        chat("bad.chat.min_above_max.json", max_tokens=2, min_tokens=5, **b),
        chat("bad.chat.top_logprobs_too_many.json", logprobs=True, top_logprobs=50, max_tokens=2, **b),
        chat("bad.chat.logit_bias_oov.json", logit_bias={str(OOV_TOKEN): 1.0}, max_tokens=4, **b),
        chat("bad.chat.unknown_model.json", model="no-such-model", max_tokens=4, **b),
        chat("bad.chat.empty_messages.json", messages=[], max_tokens=4, **b),
        chat("bad.chat.unknown_role.json", messages=[{"role": "robot", "content": "beep"}], max_tokens=4, **b),
        chat("bad.chat.too_long.json", long_text, max_tokens=4, **b),
        chat("bad.chat.max_tokens_negative.json", max_tokens=-3, **b),
        chat("bad.chat.max_completion_tokens_zero.json", max_completion_tokens=0, **b),
        chat("bad.chat.max_tokens_over_context.json", max_tokens=3000, **b),
        chat("bad.chat.missing_messages.json", messages=MISSING, max_tokens=4, **b),
        chat("bad.chat.messages_not_a_list.json", messages="hello", max_tokens=4, **b),
        chat("bad.chat.max_tokens_not_a_number.json", max_tokens="many", **b),
        chat("bad.chat.stream_options_without_stream.json", max_tokens=4, stream_options={"include_usage": True},
             **b),
        chat("bad.chat.presence_penalty_range.json", presence_penalty=3.0, max_tokens=4, **b),
        chat("bad.chat.tool_choice_without_tools.json", tool_choice="required", max_tokens=4, **b),
        chat("bad.chat.stop_token_oov.json", stop_token_ids=[OOV_TOKEN], max_tokens=4, **b),
        Shape("bad.chat.malformed_json.json", "chat", {}, bad=True, raw='{"model": "tiny", "messages": ['),
        Shape("bad.chat.body_not_an_object.json", "chat", {}, bad=True, raw="[1, 2, 3]"),
        Shape("bad.comp.malformed_json.json", "completions", {}, bad=True, raw='{"model": "tiny", "prompt": "x",}'),
        Shape("bad.chat.not_json_media_type.json", "chat", {}, bad=True, content_type="text/plain",
              raw='{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}'),
        chat("bad.chat.too_many_characters.json", "x" * 40000, max_tokens=4, **b),
        comp("bad.comp.oov_token_prompt.json", [712, OOV_TOKEN], max_tokens=4, **b),
        comp("bad.comp.oov_token_prompt.sse", [712, OOV_TOKEN], max_tokens=4, stream=True, **b),
        comp("bad.comp.oov_in_prompt_list.json", [[712], [OOV_TOKEN]], max_tokens=4, **b),
        comp("bad.comp.negative_temperature.json", temperature=-0.5, max_tokens=4, **b),
        comp("bad.comp.top_p_above_one.json", top_p=2, max_tokens=4, **b),
        comp("bad.comp.n_zero.json", n=0, max_tokens=4, **b),
        comp("bad.comp.empty_prompt.json", "", max_tokens=4, **b),
        comp("bad.comp.logprobs_too_many.json", logprobs=50, max_tokens=4, **b),
        comp("bad.comp.suffix.json", suffix="tail", max_tokens=4, **b),
        comp("bad.comp.too_long.json", long_text, max_tokens=4, **b),
        comp("bad.comp.too_long_token_prompt.json", [712] * 2100, max_tokens=4, **b),
        comp("bad.comp.max_tokens_zero.json", max_tokens=0, **b),
        comp("bad.comp.min_above_max.json", max_tokens=2, min_tokens=4, **b),
        comp("bad.comp.missing_prompt.json", MISSING, max_tokens=4, **b),
        comp("bad.comp.echo_prompt_logprobs_stream.sse", echo=True, prompt_logprobs=1, stream=True, max_tokens=2, **b),
    ]


SHAPES: list[Shape] = _chat_shapes() + _completion_shapes() + _bad_shapes()

# The bounded set `make test` sends down every path (tests/test_fidelity.py), within its time
# budget: each option once (streamed where the option is about streams or may be resumed) and
# every bad input. The whole set is the command's default (bench/fidelity.py).
BOUNDED_ANSWERS = frozenset({
    "chat.greedy.sse", "chat.min_tokens.sse", "chat.max_completion_tokens.json", "chat.seeded.json",
    "chat.n2_seeded.sse", "chat.logprobs.sse", "chat.prompt_logprobs.json", "chat.stop_string.sse",
    "chat.stop_string_included.json", "chat.stop_token_ids.json", "chat.penalties.json", "chat.logit_bias.sse",
    "chat.json_object.json", "chat.json_schema.sse", "chat.tools_auto.sse", "chat.tools_required.json",
    "chat.template_kwargs.json", "chat.continue_final.sse", "chat.content_parts.json", "chat.system_dialogue.sse",
    "chat.echo.json", "chat.include_usage.sse", "chat.continuous_usage.sse", "chat.user.json",
    "chat.return_token_ids.sse", "chat.truncate_prompt_tokens.json",
    "comp.greedy.sse", "comp.default_max_tokens.json", "comp.echo.json", "comp.prompt_list.sse",
    "comp.token_prompt.json", "comp.token_prompt_list.json", "comp.logprobs.sse", "comp.prompt_logprobs.json",
    "comp.seeded.sse", "comp.stop_string.sse", "comp.min_tokens.json", "comp.ignore_eos.json", "comp.usage.sse",
    "comp.return_token_ids.json",
})


def bounded() -> list[Shape]:
    return [s for s in SHAPES if s.bad or s.name in BOUNDED_ANSWERS]


def by_name() -> dict[str, Shape]:
    out = {s.name: s for s in SHAPES}
    if len(out) != len(SHAPES):
        raise ValueError("two shapes share a name")
    return out
