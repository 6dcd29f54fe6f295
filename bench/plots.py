"""PNG plots for the A/B report (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Arm = tuple[str, list[dict[str, Any]]]  # (label, runs of a sweep)
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def numeric_rate(run: dict[str, Any]) -> float:
    r = run["request_rate"]
    return math.inf if r == "inf" else float(r)


def ok_latencies(run: dict[str, Any]) -> tuple[list[float], list[float]]:
    """TTFTs and TPOTs (ms) of a run's successful requests, from its per-request lists."""
    ttfts, tpots = [], []
    for ttft, lat, n, err in zip(run["ttfts"], run["latencies"], run["output_lens"], run["errors"]):
        if err:
            continue
        ttfts.append(ttft * 1000)
        if n > 1:
            tpots.append((lat - ttft) / (n - 1) * 1000)
    return ttfts, tpots


def _cdf(ax, values: list[float], **kw) -> None:
    xs = sorted(values)
    if xs:
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", **kw)


def plot_latency_cdfs(arms: Sequence[Arm], path: Path) -> None:
    rates = sorted({numeric_rate(r) for _, runs in arms for r in runs})
    fig, axes = plt.subplots(len(rates), 2, figsize=(11, 3.2 * len(rates)), squeeze=False)
    for row, rate in zip(axes, rates):
        for (label, runs), color in zip(arms, _COLORS):
            for run in runs:
                if numeric_rate(run) == rate:
                    ttfts, tpots = ok_latencies(run)
                    _cdf(row[0], ttfts, color=color, label=label)
                    _cdf(row[1], tpots, color=color, label=label)
        for ax, name in zip(row, ("TTFT", "TPOT")):
            ax.set_title(f"{name} CDF at {rate:g} req/s")
            ax.set_xlabel(f"{name} (ms)")
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_goodput(arms: Sequence[Arm], knees: Sequence[Optional[float]], threshold: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0.0
    for (label, runs), knee, color in zip(arms, knees, _COLORS):
        pts = sorted((numeric_rate(r), r["request_goodput"] or 0.0) for r in runs if math.isfinite(numeric_rate(r)))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=label)
            top = max(top, pts[-1][0])
        if knee is not None:
            ax.axvline(knee, color=color, ls=":", label=f"{label} knee {knee:g} req/s")
    if top:
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="goodput = offered rate")
        ax.plot([0, top], [0, threshold * top], color="grey", ls="-.", lw=0.8,
                label=f"{threshold:.0%} of offered rate")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("goodput (req/s within all SLOs)")
    ax.set_title("Goodput vs request rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_metric_vs_rate(arms: Sequence[Arm], metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, runs), color in zip(arms, _COLORS):
        runs = sorted((r for r in runs if math.isfinite(numeric_rate(r))), key=numeric_rate)
        xs = [numeric_rate(r) for r in runs]
        for p, style in (("p50", "o-"), ("p95", "s--")):
            ys = [r.get(f"{p}_{metric}_ms") for r in runs]
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(xs, ys, style, color=color, label=f"{label} {p}")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel(f"{metric.upper()} (ms)")
    ax.set_title(f"{metric.upper()} p50 / p95 vs request rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
