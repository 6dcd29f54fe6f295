"""PNG plots for the A/B report and the cache sweep (matplotlib, Agg backend: no display needed)."""
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


def plot_sweep_panels(arms: Sequence[tuple[str, list[dict[str, Any]]]], path: Path, *, x_key: str = "session_rate",
                      x_label: str = "session rate (sessions/s)", goodput_key: str = "request_goodput",
                      title: Optional[str] = None) -> None:
    """One figure of four panels over a sweep: goodput, TTFT and TPOT (p50 solid, p95 dashed) and
    the prefix-cache hit rate, each against ``x_key``, one colour per arm."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_g, ax_t), (ax_p, ax_h) = axes
    for (label, runs), color in zip(arms, _COLORS):
        runs = sorted(runs, key=lambda r: float(r[x_key]))
        xs = [float(r[x_key]) for r in runs]

        def ys(key: str, scale: float = 1.0) -> list[float]:
            return [math.nan if r.get(key) is None else r[key] * scale for r in runs]

        ax_g.plot(xs, ys(goodput_key), "o-", color=color, label=label)
        for ax, metric in ((ax_t, "ttft"), (ax_p, "tpot")):
            ax.plot(xs, ys(f"p50_{metric}_ms"), "o-", color=color, label=f"{label} p50")
            ax.plot(xs, ys(f"p95_{metric}_ms"), "s--", color=color, alpha=0.6, label=f"{label} p95")
        ax_h.plot(xs, ys("prefix_cache_hit_rate", 100.0), "o-", color=color, label=label)
    for ax, ylabel in ((ax_g, "goodput (req/s within all SLOs)"), (ax_t, "TTFT (ms)"), (ax_p, "TPOT (ms)"),
                       (ax_h, "prefix cache hit rate (%)")):
        ax.set_xlabel(x_label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_t.set_yscale("log")
    ax_g.legend(fontsize=8)
    ax_t.legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
