"""The A/B report: goodput knees, summary.md, per-arm JSON and plots, from two arms' sweeps
(P/D and monolithic by default, or any two arms with their labels and file names).

An arm is the dict ``bench_cli.sweep`` returns (``runs``: one vLLM-named result per rate),
plus an ``arm`` entry describing where it ran. Nothing here touches a cluster.

Goodput knee. A swept rate r_i is *sustained* when
  (a) at least ``threshold`` (default 90%) of the requests sent at r_i met every SLO
      (``slo_attainment``), i.e. goodput kept within ``threshold`` of the offered rate once the
      drain after the last arrival is discounted, and
  (b) goodput rose over the previous swept rate (goodput has not stopped increasing).
The knee is the highest swept rate such that it and every lower swept rate are sustained:
past it, goodput stops tracking the offered load. It is None when even the lowest rate is not
sustained, and a lower bound ("≥") when every swept rate is. Rates of ``inf`` take no part.
Attainment is used instead of goodput/offered-rate directly because a run's duration includes
the drain of the last requests, which alone pushes goodput/rate below 0.9 at high rates with
few requests, although every request met its SLOs.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from pdserve.bench.plots import numeric_rate

DEFAULT_KNEE_THRESHOLD = 0.9


@dataclass(frozen=True)
class Knee:
    rate: Optional[float]
    top_of_sweep: bool  # every swept rate was sustained: the real knee is at or above ``rate``
    max_goodput: float
    max_goodput_rate: Optional[float]

    def describe(self) -> str:
        if self.rate is None:
            return "none: SLOs missed already at the lowest swept rate"
        return f"{'≥ ' if self.top_of_sweep else ''}{self.rate:g} req/s"


def find_knee(runs: list[dict[str, Any]], threshold: float = DEFAULT_KNEE_THRESHOLD) -> Knee:
    pts = sorted((numeric_rate(r), r.get("request_goodput") or 0.0, r.get("slo_attainment") or 0.0)
                 for r in runs if math.isfinite(numeric_rate(r)))
    if not pts:
        return Knee(None, False, 0.0, None)
    best = max(pts, key=lambda p: p[1])
    knee: Optional[float] = None
    prev_goodput = -math.inf
    for rate, goodput, attainment in pts:
        if attainment < threshold or goodput <= prev_goodput:
            return Knee(knee, False, best[1], best[0])
        knee, prev_goodput = rate, goodput
    return Knee(knee, True, best[1], best[0])


def hardware_info() -> dict[str, Any]:
    """CPU model and core counts (/proc/cpuinfo, os), and GPU names from nvidia-smi if present."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20, check=False).stdout
            gpus = [g.strip() for g in out.splitlines() if g.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return {"cpu_model": model or platform.processor() or "unknown", "logical_cores": os.cpu_count(),
            "usable_cores": usable, "gpus": gpus, "platform": platform.platform()}


def _verdict(pd: tuple[str, Knee], mono: tuple[str, Knee]) -> str:
    (a, ka), (b, kb) = pd, mono
    if ka.rate is None and kb.rate is None:
        return "inconclusive: neither arm met the SLOs at the lowest swept rate; sweep lower rates."
    if kb.rate is None:
        return f"{a} wins: it sustains {ka.describe()} while {b} misses the SLOs at every swept rate."
    if ka.rate is None:
        return f"{b} wins: it sustains {kb.describe()} while {a} misses the SLOs at every swept rate."
    if ka.rate == kb.rate:
        if ka.top_of_sweep and kb.top_of_sweep:
            return "inconclusive: both arms sustained every swept rate; sweep higher rates."
        return (f"tie: both knees at {ka.rate:g} req/s (peak goodput {a} {ka.max_goodput:.2f} vs "
                f"{b} {kb.max_goodput:.2f} req/s).")
    (w, kw), (l, kl) = ((a, ka), (b, kb)) if ka.rate > kb.rate else ((b, kb), (a, ka))
    bound = " (lower bound: sweep higher to find its knee)" if kw.top_of_sweep else ""
    return (f"{w} wins: goodput knee {kw.describe()} vs {kl.describe()} for {l} "
            f"({kw.rate / kl.rate:.2f}x the sustainable load under the same SLOs){bound}.")


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _table(arms: list[tuple[str, dict[str, Any]]]) -> list[str]:
    sessions = any("session_rate" in r for _, arm in arms for r in arm["runs"])
    rate_head = "sessions/s (offered req/s)" if sessions else "rate (req/s)"
    rows = [f"| {rate_head} | arm | completed/sent | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 | req/s | "
            "out tok/s | goodput (req/s) | SLO met | fallback | prefix cache hits |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keyed = sorted(((numeric_rate(r), i, label, r) for i, (label, arm) in enumerate(arms) for r in arm["runs"]),
                   key=lambda t: (t[0], t[1]))
    for rate, _, label, r in keyed:
        ff = r.get("fallback_fraction")
        shown = f"{r['session_rate']:g} ({rate:g})" if "session_rate" in r else f"{rate:g}"
        rows.append(
            f"| {shown} | {label} | {r['completed']}/{r['num_prompts']} | {_fmt(r.get('p50_ttft_ms'))} | "
            f"{_fmt(r.get('p95_ttft_ms'))} | {_fmt(r.get('p50_tpot_ms'), '.2f')} | {_fmt(r.get('p95_tpot_ms'), '.2f')} | "
            f"{r['request_throughput']:.2f} | {r['output_throughput']:.1f} | {_fmt(r.get('request_goodput'), '.2f')} | "
            f"{_fmt(r.get('slo_attainment'), '.0%')} | {'-' if ff is None else format(ff, '.1%')} | "
            f"{_fmt(r.get('prefix_cache_hit_rate'), '.1%')} |")
    return rows


PD_VS_MONO = (("P/D", "pd"), ("monolithic", "monolithic"))  # (label, file name) of each arm


def write_report(pd: dict[str, Any], mono: dict[str, Any], out_dir: str | Path, *,
                 hardware: Optional[dict[str, Any]] = None, threshold: float = DEFAULT_KNEE_THRESHOLD,
                 arms: tuple[tuple[str, str], tuple[str, str]] = PD_VS_MONO) -> Path:
    """Write summary.md, each arm's JSON (``arms``: (label, file name) of the first and the
    second; default P/D in pd.json and monolithic in monolithic.json) and the PNG plots into
    ``out_dir``; return summary.md."""
    from pdserve.bench.plots import plot_goodput, plot_latency_cdfs, plot_metric_vs_rate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hw = hardware if hardware is not None else hardware_info()
    (label_a, file_a), (label_b, file_b) = arms
    files = [f"{file_a}.json", f"{file_b}.json"]
    arms = [(label_a, pd), (label_b, mono)]
    knees = {label: find_knee(arm["runs"], threshold) for label, arm in arms}
    for label, arm in arms:
        arm["goodput_knee"] = {"rate": knees[label].rate, "top_of_sweep": knees[label].top_of_sweep,
                               "threshold": threshold}
    for name, (_, arm) in zip(files, arms):
        (out / name).write_text(json.dumps(_without_itls(arm), indent=2, allow_nan=False))

    series = [(label, arm["runs"]) for label, arm in arms]
    plot_latency_cdfs(series, out / "latency_cdf.png")
    plot_goodput(series, [knees[label].rate for label, _ in arms], threshold, out / "goodput_vs_rate.png")
    plot_metric_vs_rate(series, "ttft", out / "ttft_vs_rate.png")
    plot_metric_vs_rate(series, "tpot", out / "tpot_vs_rate.png")

    verdict = _verdict((label_a, knees[label_a]), (label_b, knees[label_b]))
    gpus = ", ".join(hw.get("gpus") or []) or "none"
    title = ("disaggregated prefill/decode vs monolithic" if (label_a, label_b) == ("P/D", "monolithic")
             else f"{label_a} vs {label_b}")
    lines = [
        f"# pdserve A/B: {title}",
        "",
        f"Generated {datetime.now().isoformat(timespec='seconds')}.",
        "",
        "## Hardware",
        "",
        f"- CPU: {hw.get('cpu_model')}, {hw.get('logical_cores')} logical cores "
        f"({hw.get('usable_cores')} usable by the benchmark process)",
        f"- GPU: {gpus}",
        f"- Platform: {hw.get('platform', '-')}",
        "",
        "## Arms",
        "",
    ]
    for label, arm in arms:
        meta = arm.get("arm", {})
        lines.append(f"- **{label}**: {meta.get('source', arm.get('base_url', '?'))}"
                     + (f"; {meta['config_summary']}" if meta.get("config_summary") else ""))
    if pd.get("arm", {}).get("budget"):
        lines.append(f"- Hardware budget per arm: {pd['arm']['budget']}")
    for label, arm in arms:
        meta = arm.get("arm", {})
        if meta.get("config_text"):
            lines += ["", f"<details><summary>{label} config: {meta.get('config_path')}</summary>", "",
                      "```yaml", meta["config_text"].rstrip(), "```", "", "</details>"]
    lines += [
        "",
        "## Workload",
        "",
        f"- {pd.get('workload', '?')}; endpoint {pd.get('endpoint', '?')}, model {pd.get('model_id', '?')}",
        f"- SLOs for goodput (a request must meet all): {_slo_text(pd.get('goodput_slos_ms'))}",
        f"- Load: {_load_line(pd)}",
        "",
        "## Results",
        "",
        "Latencies in ms. *SLO met*: share of sent requests that met every SLO. *fallback*: share of "
        "completed requests the router served by fallback (x-pdserve-path). *prefix cache hits*: prompt "
        "tokens the engines found cached, over all prompt tokens (usage.prompt_tokens_details).",
        "",
        *_table(arms),
        "",
        "## Goodput knees",
        "",
        f"Knee: the highest swept rate up to which every rate had at least {threshold:.0%} of its requests "
        "within all SLOs and goodput still rose over the previous rate.",
        "",
    ]
    for label, _ in arms:
        k = knees[label]
        peak = f"{k.max_goodput:.2f} req/s at {k.max_goodput_rate:g} req/s" if k.max_goodput_rate is not None else "-"
        lines.append(f"- {label}: {k.describe()} (peak goodput {peak})")
    lines += [
        "",
        f"**Verdict:** {verdict}",
        "",
        "## Plots",
        "",
        "![goodput vs rate](goodput_vs_rate.png)",
        "",
        "![TTFT vs rate](ttft_vs_rate.png)",
        "",
        "![TPOT vs rate](tpot_vs_rate.png)",
        "",
        "![latency CDFs](latency_cdf.png)",
        "",
        f"Raw results (vLLM `bench serve` field names, one entry of `runs` per rate, per-token `itls` left out): "
        f"`{files[0]}`, `{files[1]}`.",
        "",
    ]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary


def _without_itls(arm: dict[str, Any]) -> dict[str, Any]:
    """The arm with each run's per-token gaps left out (most of its bytes; the report uses the
    per-request lists, and ``pdserve bench --result-file`` keeps the gaps)."""
    return dict(arm, runs=[{k: v for k, v in r.items() if k != "itls"} for r in arm.get("runs", [])])


def _slo_text(slos: Optional[dict[str, float]]) -> str:
    if not slos:
        return "none given"
    return ", ".join(f"{name.upper()} ≤ {ms:g} ms" for name, ms in slos.items())


def _load_line(arm: dict[str, Any]) -> str:
    runs = arm.get("runs") or [{}]
    r = runs[0]
    rates = ", ".join(str(x.get("request_rate")) for x in runs)
    if "session_rate" in r:
        sessions = ", ".join(str(x.get("session_rate")) for x in runs)
        return (f"session rates {sessions} sessions/s (offered {rates} req/s), burstiness {r.get('burstiness', 1.0)} "
                f"({'Poisson' if r.get('burstiness') == 1.0 else 'gamma'} session arrivals), "
                f"max concurrent sessions {r.get('max_concurrency')}")
    return (f"rates {rates} req/s, burstiness {r.get('burstiness', 1.0)} "
            f"({'Poisson' if r.get('burstiness') == 1.0 else 'gamma arrivals'}), "
            f"max concurrency {r.get('max_concurrency')}")
