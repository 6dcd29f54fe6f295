"""``pdserve bench``: load an OpenAI-compatible server and report vLLM-style serving metrics.

    pdserve bench --url http://127.0.0.1:8000 --request-rate 4 --num-prompts 200 \\
        --goodput ttft:500 tpot:50 --result-file result.json
    pdserve bench --url ... --rates 1,2,4,8 --workload shared-prefix --prefix-len 512
    pdserve bench --url ... --workload tenants --tenant gold:KEY1:3 --tenant free:KEY2:1
    pdserve bench --url ... --max-concurrency 16 --request-rate inf
    pdserve bench --url ... --workload multi-turn --rates 0.5,1,2 --num-sessions 40 --turns 5 \
        --system-prompt-len 512 --user-turn-len 64 --answer-len 64 --think-time-s 1

With --workload multi-turn the rates are sessions per second (Poisson arrivals of
conversations); inside a session each turn waits for the previous answer and a think time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from pdserve.bench.loadgen import ENDPOINTS, LoadSpec, ServerUnreachable, discover_model, run_benchmark, warm_up
from pdserve.bench.stats import DEFAULT_PERCENTILES, parse_goodput
from pdserve.bench.workloads import (KINDS, SESSION_KINDS, MultiTurnSpec, Tenant, WorkloadSpec, chat_sessions,
                                     generate)


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a request rate (a number of req/s, or inf)") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0, got {text!r}")
    return v


def _rates(text: str) -> list[float]:
    rates = [_rate(t.strip()) for t in text.split(",") if t.strip()]
    if not rates:
        raise argparse.ArgumentTypeError("give at least one rate, e.g. 1,2,4,8")
    return rates


def _positive(kind: type):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v
    return parse


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _percentiles(text: str) -> list[float]:
    try:
        ps = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of percentiles") from None
    if not ps or any(not 0 <= p <= 100 for p in ps):
        raise argparse.ArgumentTypeError(f"percentiles must lie in [0, 100], got {text!r}")
    return ps


def _tenant(text: str) -> Tenant:
    name, _, rest = text.partition(":")
    key, _, weight = rest.rpartition(":")  # the key itself may contain ':'
    if not name or not key or not weight:
        raise argparse.ArgumentTypeError(f"tenant {text!r} is not NAME:API_KEY:WEIGHT")
    try:
        w = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tenant {text!r}: weight {weight!r} is not a number") from None
    if not w > 0:
        raise argparse.ArgumentTypeError(f"tenant {text!r}: weight must be > 0")
    return Tenant(name, key, w)


def _goodput(text: str) -> str:
    try:
        parse_goodput([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=(*KINDS, *SESSION_KINDS), default="chat")
    w.add_argument("--num-prompts", type=_positive(int), default=100, help="requests per run (per rate)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--endpoint", choices=list(ENDPOINTS), default="chat")
    w.add_argument("--input-len-mean", type=_positive(float), default=256.0)
    w.add_argument("--input-len-sigma", type=_non_negative_float, default=0.5, help="sigma of the lognormal")
    w.add_argument("--input-len-min", type=_positive(int), default=8)
    w.add_argument("--input-len-max", type=_positive(int), default=1024)
    w.add_argument("--output-len-mean", type=_positive(float), default=64.0)
    w.add_argument("--output-len-sigma", type=_non_negative_float, default=0.5)
    w.add_argument("--output-len-min", type=_positive(int), default=4)
    w.add_argument("--output-len-max", type=_positive(int), default=512)
    w.add_argument("--input-len", type=_positive(int), default=256, help="fixed workload")
    w.add_argument("--output-len", type=_positive(int), default=64, help="fixed and shared-prefix workloads")
    w.add_argument("--prefix-len", type=_positive(int), default=512, help="shared-prefix workload")
    w.add_argument("--num-prefixes", type=_positive(int), default=4)
    w.add_argument("--suffix-len", type=_positive(int), default=64)
    w.add_argument("--tenant", type=_tenant, action="append", default=[], metavar="NAME:API_KEY:WEIGHT",
                   help="repeatable; each request picks a tenant by weight and sends its key")
    m = p.add_argument_group("multi-turn workload (rates are sessions per second)")
    m.add_argument("--num-sessions", type=_positive(int), default=20, help="sessions per run (per rate)")
    m.add_argument("--arrival-s", type=_positive(float), default=None,
                   help="instead of --num-sessions: sessions arrive for this long at each rate (rate x this "
                        "sessions), so every rate reaches the same steady state")
    m.add_argument("--turns", type=_positive(int), default=5, help="user turns per session")
    m.add_argument("--system-prompt-len", type=_positive(int), default=512,
                   help="tokens of the system prompt every session shares")
    m.add_argument("--user-turn-len", type=_positive(int), default=64, help="tokens of each user turn")
    m.add_argument("--answer-len", type=_positive(int), default=64, help="tokens of each answer (max_tokens)")
    m.add_argument("--think-time-s", type=_non_negative_float, default=1.0,
                   help="mean of the exponential pause between an answer and the next turn")


def add_load_args(p: argparse.ArgumentParser, sweep_only: bool = False) -> None:
    g = p.add_argument_group("load and metrics")
    if not sweep_only:
        g.add_argument("--request-rate", type=_rate, default=None,
                       help="req/s, or inf (default): all requests at once, bounded by --max-concurrency")
    g.add_argument("--rates", type=_rates, default=None, required=sweep_only,
                   help="comma-separated sweep, one run per rate, e.g. 1,2,4,8")
    g.add_argument("--burstiness", type=_positive(float), default=1.0,
                   help="gamma shape of the inter-arrival times: 1 Poisson, <1 burstier, >1 steadier")
    g.add_argument("--max-concurrency", type=_positive(int), default=None, help="at most this many in flight")
    g.add_argument("--goodput", nargs="+", type=_goodput, default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000 (a request must meet all)")
    g.add_argument("--percentiles", "--metric-percentiles", dest="percentiles", type=_percentiles,
                   default=list(DEFAULT_PERCENTILES), help="e.g. 50,90,95,99")
    g.add_argument("--num-warmups", type=int, default=0, help="unmeasured requests sent before each run")
    g.add_argument("--api-key", default=None, help="bearer key for requests without a tenant")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer (path or Hugging Face name) for prompts of exact token lengths; default: "
                        "the served model's, when /v1/models names one this machine can load, else "
                        "approximate lengths (one word ~ one token)")
    g.add_argument("--timeout-s", type=_positive(float), default=600.0, help="per-request timeout")
    g.add_argument("--disable-tqdm", action="store_true")


def workload_from_args(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(
        kind=args.workload, num_prompts=args.num_prompts, seed=args.seed,
        input_len_mean=args.input_len_mean, input_len_sigma=args.input_len_sigma, input_len_min=args.input_len_min,
        input_len_max=args.input_len_max, output_len_mean=args.output_len_mean, output_len_sigma=args.output_len_sigma,
        output_len_min=args.output_len_min, output_len_max=args.output_len_max, input_len=args.input_len,
        output_len=args.output_len, prefix_len=args.prefix_len, num_prefixes=args.num_prefixes,
        suffix_len=args.suffix_len, tenants=tuple(args.tenant))


def multi_turn_from_args(args: argparse.Namespace) -> MultiTurnSpec:
    return MultiTurnSpec(num_sessions=args.num_sessions, turns=args.turns, system_prompt_len=args.system_prompt_len,
                         user_turn_len=args.user_turn_len, answer_len=args.answer_len,
                         think_time_s=args.think_time_s, seed=args.seed)


def check_args(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with a combination of arguments, or None."""
    if args.workload in SESSION_KINDS:
        if args.endpoint != "chat":
            return "--workload multi-turn needs --endpoint chat (a conversation is a list of messages)"
        if args.tenant:
            return "--workload multi-turn sends no --tenant keys; give --api-key"
    elif getattr(args, "arrival_s", None) is not None:
        return "--arrival-s sizes --workload multi-turn's sessions; other workloads take --num-prompts"
    if getattr(args, "request_rate", None) is not None and args.rates is not None:
        return "give --request-rate or --rates, not both"
    if args.input_len_min > args.input_len_max:
        return "--input-len-min exceeds --input-len-max"
    if args.output_len_min > args.output_len_max:
        return "--output-len-min exceeds --output-len-max"
    if args.workload == "tenants" and not args.tenant:
        return "--workload tenants needs at least one --tenant NAME:API_KEY:WEIGHT"
    names = [t.name for t in args.tenant]
    if len(set(names)) != len(names):
        return "tenant names must be unique"
    if args.num_warmups < 0:
        return "--num-warmups must be >= 0"
    for url in (getattr(args, "url", None),):
        if url is not None and not url.startswith(("http://", "https://")):
            return f"--url {url!r} must start with http:// or https://"
    return None


def sweep(base_url: str, args: argparse.Namespace, rates: list[float], model: Optional[str] = None,
          slos_ms: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Run the workload once per rate against ``base_url``; the result file's content.

    Every run replays the same request set (same seed) so rates differ only in load; but each
    rate's multi-turn sessions are new conversations (seed + the rate's index) over the same
    system prompt, since a conversation replayed would find its whole history cached.
    Raises ServerUnreachable if nothing answers at ``base_url``."""
    from pdserve.bench.sessions import run_session_benchmark

    base_url = base_url.rstrip("/")
    listed = discover_model(base_url, args.api_key)
    model = model or listed
    if model is None:
        raise ServerUnreachable(f"{base_url}/v1/models lists no model; give --model")
    tokenizer = load_tokenizer(getattr(args, "tokenizer", None), base_url, args.api_key)
    multi_turn = args.workload in SESSION_KINDS
    spec = multi_turn_from_args(args) if multi_turn else workload_from_args(args)
    requests = [] if multi_turn else generate(spec, tokenizer)
    slos = slos_ms if slos_ms is not None else parse_goodput(args.goodput or [])
    warmups = generate(WorkloadSpec(kind="fixed", num_prompts=args.num_warmups, seed=spec.seed + 7919,
                                    input_len=64, output_len=8)) if args.num_warmups else []
    runs = []
    for i, rate in enumerate(rates):
        warm_up(base_url, args.endpoint, model, warmups, args.api_key, args.timeout_s)
        load = LoadSpec(rate, args.burstiness, args.max_concurrency)
        if multi_turn:
            n = max(1, round(rate * args.arrival_s)) if args.arrival_s and math.isfinite(rate) else spec.num_sessions
            sessions = chat_sessions(replace(spec, num_sessions=n, seed=spec.seed + i), tokenizer)
            run = run_session_benchmark(base_url, model, sessions, load, seed=args.seed, percentiles=args.percentiles, slos_ms=slos,
                                        api_key=args.api_key, timeout_s=args.timeout_s,
                                        progress=not args.disable_tqdm)
        else:
            run = run_benchmark(base_url, args.endpoint, model, requests, load, seed=args.seed,
                                percentiles=args.percentiles, slos_ms=slos, api_key=args.api_key,
                                timeout_s=args.timeout_s, progress=not args.disable_tqdm)
        runs.append(run)
        print_run(run, args.percentiles)
    if multi_turn and args.arrival_s:
        size = {"arrival_s": args.arrival_s}
    elif multi_turn:
        size = {"num_sessions": spec.num_sessions, "num_prompts": spec.num_sessions * spec.turns}
    else:
        size = {"num_prompts": spec.num_prompts}
    workload = spec.describe(args.arrival_s) if multi_turn else spec.describe()
    return {"base_url": base_url, "model_id": model, "endpoint": args.endpoint, "workload": workload,
            **size, "seed": spec.seed, "goodput_slos_ms": slos, "percentiles": list(args.percentiles), "runs": runs}


def load_tokenizer(name: Optional[str], base_url: str, api_key: Optional[str]):
    """The tokenizer to size prompts with, or None (approximate lengths)."""
    import json
    import urllib.request

    if name is None:
        try:
            req = urllib.request.Request(base_url + "/v1/models",
                                         headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
            with urllib.request.urlopen(req, timeout=10) as r:
                name = (json.load(r).get("data") or [{}])[0].get("root")
        except Exception:  # noqa: BLE001 - no tokenizer: approximate lengths
            return None
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        if name.startswith("builtin:"):
            from pdserve.engine.tiny_model import resolve_model

            name = resolve_model(name)
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001
        print(f"pdserve bench: cannot load tokenizer {name!r} ({e}); prompt lengths are approximate")
        return None


def print_run(r: dict[str, Any], percentiles: list[float]) -> None:
    from pdserve.bench.stats import percentile_key

    def ms(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    line = "=" * 60
    print(line)
    if "session_rate" in r:
        print(f"sessions {r['session_rate']}/s of {r['turns_per_session']} turns (offered {r['request_rate']} req/s)  "
              f"burstiness {r['burstiness']:g}  max concurrent sessions {r['max_concurrency']}")
        print(f"sessions completed {r['sessions_completed']}/{r['num_sessions']}  "
              f"turns not sent {r['turns_not_sent']}")
    else:
        print(f"rate {r['request_rate']} req/s  burstiness {r['burstiness']:g}  max concurrency {r['max_concurrency']}")
    print(f"completed {r['completed']}/{r['num_prompts']} (failed {r['failed']})  duration {r['duration']:.2f} s  "
          f"statuses {r['status_counts']}")
    print(f"throughput {r['request_throughput']:.2f} req/s, {r['output_throughput']:.1f} out tok/s, "
          f"{r['total_token_throughput']:.1f} total tok/s")
    if r["request_goodput"] is not None:
        print(f"goodput {r['request_goodput']:.2f} req/s ({r['good_requests']} met {r['goodput_slos_ms']})")
    if r["fallback_fraction"] is not None:
        print(f"paths {r['paths']}  fallback fraction {r['fallback_fraction']:.3f}")
    hit = r.get("prefix_cache_hit_rate")
    print("prefix cache hit rate " + ("- (the server reported no usage.prompt_tokens_details)" if hit is None else
                                      f"{hit:.1%} ({r['total_cached_tokens']} prompt tokens cached)"))
    for m in ("ttft", "tpot", "itl", "e2el"):
        ps = "  ".join(f"p{percentile_key(p)} {ms(r[f'p{percentile_key(p)}_{m}_ms'])}" for p in percentiles)
        print(f"{m.upper():>5} ms: mean {ms(r[f'mean_{m}_ms'])}  median {ms(r[f'median_{m}_ms'])}  {ps}")
    for turn, t in r.get("per_turn", {}).items():
        hit = "-" if t["prefix_cache_hit_rate"] is None else f"{t['prefix_cache_hit_rate']:.1%}"
        prompt = "-" if t["mean_prompt_tokens"] is None else f"{t['mean_prompt_tokens']:.0f}"
        print(f"  turn {turn}: completed {t['completed']}/{t['num_prompts']}  prompt tokens {prompt}  "
              f"hit rate {hit}  TTFT median {ms(t['median_ttft_ms'])} ms")
    for name, t in r.get("per_tenant", {}).items():
        print(f"  tenant {name}: completed {t['completed']}/{t['num_prompts']} statuses {t['status_counts']} "
              f"TTFT median {ms(t['median_ttft_ms'])} ms")
    for e in r["error_samples"][:3]:
        print(f"  error: {e}")
    print(line, flush=True)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, allow_nan=False))


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="load an OpenAI-compatible server; vLLM-style latency, throughput, goodput",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    b.add_argument("--model", default=None, help="default: the first id from GET /v1/models")
    b.add_argument("--result-file", default=None, help="write the JSON result here")
    add_workload_args(b)
    add_load_args(b)
    b.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem:
        print(f"pdserve bench: error: {problem}", file=sys.stderr)
        return 2
    rates = args.rates or [args.request_rate if args.request_rate is not None else math.inf]
    try:
        result = sweep(args.url, args, rates, model=args.model)
    except ServerUnreachable as e:
        print(f"pdserve bench: {e}", file=sys.stderr)
        return 1
    if args.result_file:
        write_json(args.result_file, result)
        print(f"wrote {args.result_file}")
    return 0
