"""Synthetic, seeded request sets: lognormal chat, fixed lengths, shared prefixes, tenant mixes,
and multi-turn chat sessions (``chat_sessions``; bench/sessions.py sends them).

Prompts are words drawn from a fixed vocabulary of short, common English words, which BPE
tokenizers mostly encode as one token each (with the leading space), so N words come to
about N prompt tokens. The real count comes back in ``usage.prompt_tokens``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

KINDS = ("chat", "fixed", "shared-prefix", "tenants")  # request sets (``generate``)
SESSION_KINDS = ("multi-turn",)  # conversations (``chat_sessions``)

VOCAB: tuple[str, ...] = tuple("""
the of and to in is it you that he was for on are as with his they at be this have from or one
had by word but not what all were we when your can said there use an each which she do how their
if will up other about out many then them these so some her would make like him into time has look
two more write go see number no way could people my than first water been call who oil its now find
long down day did get come made may part over new sound take only little work know place year live
me back give most very after thing our just name good man think say great where help through much
before line right too mean old any same tell boy follow came want show also around form three small
set put end does another well large must big even such because turn here why ask went men read need
land different home us move try kind hand picture again change off play spell air away animal house
point page letter mother answer found study still learn should world high every near add food between
own below country plant last school father keep tree never start city earth eye light thought head
under story saw left few while along might close something seem next hard open example begin life
always those both paper together got group often run important until children side feet car mile
night walk white sea began grow took river four carry state once book hear stop without second late
""".split())


@dataclass(frozen=True)
class Tenant:
    name: str
    api_key: str
    weight: float


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int  # target length in tokens (exact with a tokenizer; else one word ~ one token)
    output_len: int  # max_tokens, with ignore_eos so the server generates exactly this many
    tenant: Optional[str] = None
    api_key: Optional[str] = None
    prefix_id: Optional[int] = None  # shared-prefix workload: which prefix the prompt starts with


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str = "chat"
    num_prompts: int = 100
    seed: int = 0
    # chat / tenants: lognormal lengths; the means are of the lengths (not of their logs)
    input_len_mean: float = 256.0
    input_len_sigma: float = 0.5
    input_len_min: int = 8
    input_len_max: int = 1024
    output_len_mean: float = 64.0
    output_len_sigma: float = 0.5
    output_len_min: int = 4
    output_len_max: int = 512
    # fixed (and the output length of shared-prefix)
    input_len: int = 256
    output_len: int = 64
    # shared-prefix
    prefix_len: int = 512
    num_prefixes: int = 4
    suffix_len: int = 64
    tenants: tuple[Tenant, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        if self.kind == "fixed":
            s = f"fixed: {self.input_len} tokens in, {self.output_len} out"
        elif self.kind == "shared-prefix":
            s = (f"shared-prefix: {self.num_prefixes} prefixes of {self.prefix_len} tokens + "
                 f"{self.suffix_len}-token suffixes, {self.output_len} out")
        else:
            s = (f"{self.kind}: lognormal input mean {self.input_len_mean:g} sigma {self.input_len_sigma:g} "
                 f"[{self.input_len_min}, {self.input_len_max}], output mean {self.output_len_mean:g} "
                 f"sigma {self.output_len_sigma:g} [{self.output_len_min}, {self.output_len_max}]")
        if self.tenants:
            s += "; tenants " + ", ".join(f"{t.name} (weight {t.weight:g})" for t in self.tenants)
        return f"{s}; {self.num_prompts} requests, seed {self.seed}"


# The fixed benchmarks' prompts (make bench, the chaos and router-capacity benches): "Req i: "
# and ``words`` words from this list, about 1.25 tokens a word with the built-in tiny tokenizer.
BENCH_WORDS = ("prefill decode cache block transfer engine router replica request latency throughput goodput stream "
               "queue budget tenant priority cluster fallback link token model memory compute network").split()


def numbered_prompts(n: int, words: int, seed: int = 0) -> list[str]:
    """``n`` distinct seeded prompts of ``words`` words each."""
    rng = random.Random(seed)
    return [f"Req {i}: " + " ".join(rng.choice(BENCH_WORDS) for _ in range(words)) for i in range(n)]


def make_text(n_tokens: int, rng: random.Random, tokenizer=None) -> str:
    """Text of about ``n_tokens`` tokens; exactly that many when the server's tokenizer is given
    (words are drawn, encoded, and the ids cut to length and decoded, as vLLM's random dataset
    does with token ids)."""
    n = max(1, n_tokens)
    if tokenizer is None:
        return " ".join(rng.choices(VOCAB, k=n))
    ids: list[int] = []
    while len(ids) < n:
        ids = tokenizer.encode(" ".join(rng.choices(VOCAB, k=n + 8)), add_special_tokens=False)
    text = tokenizer.decode(ids[:n])
    # a cut through a multi-byte piece can re-encode one token longer or shorter; trim to fit
    while len(tokenizer.encode(text, add_special_tokens=False)) > n and " " in text:
        text = text.rsplit(" ", 1)[0]
    return text


def lognormal_lengths(n: int, mean: float, sigma: float, lo: int, hi: int, rng: np.random.Generator) -> list[int]:
    """``n`` lengths whose underlying lognormal has mean ``mean``, rounded and clipped to [lo, hi]."""
    mu = np.log(mean) - sigma * sigma / 2.0  # E[exp(N(mu, s^2))] = exp(mu + s^2/2)
    raw = rng.lognormal(mu, sigma, size=n)
    return [int(x) for x in np.clip(np.rint(raw), lo, hi)]


def pick_tenants(n: int, tenants: tuple[Tenant, ...], rng: random.Random) -> list[Optional[Tenant]]:
    if not tenants:
        return [None] * n
    return rng.choices(tenants, weights=[t.weight for t in tenants], k=n)


def generate(spec: WorkloadSpec, tokenizer=None) -> list[SampleRequest]:
    if spec.kind not in KINDS:
        raise ValueError(f"unknown workload {spec.kind!r}; choose from {', '.join(KINDS)}")
    n = spec.num_prompts
    nrng = np.random.default_rng(spec.seed)
    rng = random.Random(spec.seed)
    prefix_ids: list[Optional[int]] = [None] * n
    if spec.kind == "fixed":
        ins, outs = [spec.input_len] * n, [spec.output_len] * n
        prompts = [make_text(spec.input_len, rng, tokenizer) for _ in range(n)]
    elif spec.kind == "shared-prefix":
        prefixes = [make_text(spec.prefix_len, rng, tokenizer) for _ in range(spec.num_prefixes)]
        prefix_ids = [rng.randrange(spec.num_prefixes) for _ in range(n)]
        prompts = [f"{prefixes[p]} {make_text(spec.suffix_len, rng, tokenizer)}" for p in prefix_ids]
        ins, outs = [spec.prefix_len + spec.suffix_len] * n, [spec.output_len] * n
    else:
        ins = lognormal_lengths(n, spec.input_len_mean, spec.input_len_sigma, spec.input_len_min,
                                spec.input_len_max, nrng)
        outs = lognormal_lengths(n, spec.output_len_mean, spec.output_len_sigma, spec.output_len_min,
                                 spec.output_len_max, nrng)
        prompts = [make_text(k, rng, tokenizer) for k in ins]
    tenants = pick_tenants(n, spec.tenants, rng)
    return [SampleRequest(prompt=p, prompt_len=i, output_len=o, tenant=t.name if t else None,
                          api_key=t.api_key if t else None, prefix_id=pid)
            for p, i, o, t, pid in zip(prompts, ins, outs, tenants, prefix_ids)]


# ---------------------------------------------------------------------------------------------
# multi-turn chat


@dataclass(frozen=True)
class MultiTurnSpec:
    """Chat sessions that share one system prompt: each sends ``turns`` user turns, a turn only
    after the previous answer streamed in full and a think time, each with the whole
    conversation so far (the model's own answers included), so a turn's prompt is mostly the
    previous turn's. Lengths are in tokens (exact with the server's tokenizer)."""

    num_sessions: int = 20
    turns: int = 5
    system_prompt_len: int = 512
    user_turn_len: int = 64
    answer_len: int = 64  # max_tokens, with ignore_eos
    think_time_s: float = 1.0  # mean of the exponential pause between an answer and the next turn
    seed: int = 0  # the sessions' user turns and think times
    system_seed: int = 0  # the shared system prompt (kept when ``seed`` moves, as a service keeps its own)

    def describe(self, arrival_s: Optional[float] = None) -> str:
        """``arrival_s``: the sessions arrive for this long at each rate (instead of ``num_sessions``)."""
        count = f"sessions arriving for {arrival_s:g} s at each rate" if arrival_s else f"{self.num_sessions} sessions"
        return (f"multi-turn: {count}, {self.turns} turns each, a shared {self.system_prompt_len}-token system "
                f"prompt, {self.user_turn_len}-token user turns, {self.answer_len}-token answers, think time "
                f"exponential with mean {self.think_time_s:g} s; seed {self.seed}")


@dataclass(frozen=True)
class ChatSession:
    system_prompt: str
    user_turns: tuple[str, ...]
    think_times_s: tuple[float, ...]  # the pause after answer i, before turn i + 1
    answer_len: int


def chat_sessions(spec: MultiTurnSpec, tokenizer=None) -> list[ChatSession]:
    """The sessions of ``spec``: one system prompt for all, seeded user turns and think times."""
    system = make_text(spec.system_prompt_len, random.Random(f"system-{spec.system_seed}"), tokenizer)
    rng = random.Random(spec.seed)
    sessions = []
    for _ in range(spec.num_sessions):
        turns = tuple(make_text(spec.user_turn_len, rng, tokenizer) for _ in range(spec.turns))
        pauses = tuple(rng.expovariate(1.0 / spec.think_time_s) if spec.think_time_s > 0 else 0.0
                       for _ in range(spec.turns - 1))
        sessions.append(ChatSession(system, turns, pauses, spec.answer_len))
    return sessions
