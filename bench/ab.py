"""``pdserve ab``: two arms on the same hardware budget, one rate sweep each: P/D against
monolithic, or any two named arms (bench/arms.py) or configs with overrides.

    pdserve ab --pd-config configs/cpu-pd.yaml --mono-config configs/cpu-monolithic.yaml \\
        --rates 1,2,4 --num-prompts 200 --out ab-report/
    pdserve ab --pd-url http://127.0.0.1:8000 --mono-url http://127.0.0.1:8001 --rates 1,2,4 --out ab-report/
    pdserve ab --arms mono-least-loaded,pd-adaptive --workload multi-turn --rates 0.5,1,2 --out ab-report/
    pdserve ab --arms configs/cpu-pd.yaml,configs/cpu-pd.yaml --set-b router.disaggregation=always ...

Named arms: mono-least-loaded, mono-cache-aware, pd-always, pd-adaptive (bench/arms.py says
what each is). With configs, each arm's cluster is started in turn (healthy /health first),
swept, and stopped before the next starts, so the arms never share the machine. The two
configs must spend the same hardware: the same total CPU cores across pools (device cpu) or
the same total GPUs (device gpu). Goodput SLOs default to the first arm's config's ``slo``
section (the P/D config's with --pd-config).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from pdserve.bench.arms import ArmError, resolve
from pdserve.bench.bench_cli import add_load_args, add_workload_args, check_args, sweep, write_json
from pdserve.bench.loadgen import ServerUnreachable
from pdserve.bench.ports import free_port
from pdserve.bench.stats import parse_goodput
from pdserve.settings.cluster import ClusterConfig, load_config


class BudgetMismatch(ValueError):
    pass


def hardware_budget(cfg: ClusterConfig) -> tuple[str, float]:
    """("cpu", total cores over every replica of every pool) or ("gpu", total GPUs)."""
    pools = cfg.pools().values()
    if cfg.device == "cpu":
        return "cpu", float(sum(len(p.cores_for(i) or []) for p in pools for i in range(p.max_replicas)))
    return "gpu", float(sum(p.max_replicas * p.gpus_per_replica * p.tensor_parallel_size for p in pools))


def _budget_text(budget: tuple[str, float]) -> str:
    kind, n = budget
    return f"{n:g} CPU cores" if kind == "cpu" else f"{n:g} GPUs"


def check_same_budget(pd: ClusterConfig, mono: ClusterConfig, labels: tuple[str, str] = ("P/D", "monolithic")) -> str:
    """The shared budget, described; BudgetMismatch when the arms would not spend the same hardware."""
    a, b = hardware_budget(pd), hardware_budget(mono)
    la, lb = labels
    if a[0] != b[0]:
        raise BudgetMismatch(f"the {la} config runs on {a[0].upper()} and the {lb} config on {b[0].upper()}: "
                             "an A/B needs both arms on the same kind of device")
    if a[1] != b[1]:
        raise BudgetMismatch(f"hardware budgets differ: {la} uses {_budget_text(a)} ({describe_config(pd)}), "
                             f"{lb} uses {_budget_text(b)} ({describe_config(mono)}); "
                             "give both arms the same total")
    return _budget_text(a)


def describe_config(cfg: ClusterConfig) -> str:
    parts = []
    for name, p in cfg.pools().items():
        if cfg.device == "cpu":
            cores = " ".join(f"[{p.cpu_cores[i]}]" for i in range(p.replicas)) if p.cpu_cores else "?"
            parts.append(f"{name} {p.replicas}x cores {cores}")
        else:
            parts.append(f"{name} {p.replicas}x {p.gpus_per_replica * p.tensor_parallel_size:g} GPU")
    return f"mode {cfg.mode}, {cfg.device}, " + ", ".join(parts) + f", model {cfg.model.path}"


def config_slos(cfg: ClusterConfig) -> dict[str, float]:
    slos = {"ttft": cfg.slo.ttft_ms, "tpot": cfg.slo.tpot_ms}
    if cfg.slo.e2e_ms is not None:
        slos["e2el"] = cfg.slo.e2e_ms
    return slos


def run_arm(args: argparse.Namespace, name: str, config_path: Optional[str], url: Optional[str],
            cfg: Optional[ClusterConfig], slos: dict[str, float], config_text: Optional[str] = None,
            label: Optional[str] = None) -> dict[str, Any]:
    """Sweep one arm: against ``url`` as it is, or a cluster started from ``cfg`` and stopped after.
    ``config_text``: what the report shows of the config (default: the file at ``config_path``)."""
    model = args.model or (cfg.model.served_name if cfg else None)
    if config_text is None and config_path:
        config_text = Path(config_path).read_text()
    meta: dict[str, Any] = {"name": name, "label": label or name, "config_path": config_path,
                            "config_summary": describe_config(cfg) if cfg else None, "config_text": config_text}
    if url:
        from pdserve.bench.cluster_runtime import runtime

        try:
            runtime().wait_ready(url, timeout_s=args.health_timeout_s)
        except TimeoutError as e:
            raise ServerUnreachable(str(e)) from None
        meta["source"] = f"running server at {url}" + (f" (config {config_path})" if config_path else "")
        result = sweep(url, args, args.rates, model=model, slos_ms=slos)
    else:
        from pdserve.bench.cluster_runtime import runtime

        rt = runtime()
        print(f"pdserve ab: starting the {name} cluster from {config_path}", flush=True)
        started = rt.start_cluster(cfg, port=free_port())  # waits until /health answers 200
        try:
            meta["source"] = f"cluster started from {config_path} by pdserve ab"
            result = sweep(started, args, args.rates, model=model, slos_ms=slos)
        finally:
            print(f"pdserve ab: stopping the {name} cluster", flush=True)
            rt.stop_cluster()
    result["arm"] = meta
    return result


def add_parser(sub) -> None:
    a = sub.add_parser("ab", help="A/B two arms (P/D against monolithic, or any two named arms) on the same "
                                  "hardware: goodput knees, report, plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--arms", default=None, metavar="A,B",
                   help="two arms, each a name (mono-least-loaded, mono-cache-aware, pd-always, pd-adaptive) or a "
                        "config file; instead of --pd-config/--mono-config")
    a.add_argument("--set-a", action="append", default=[], metavar="KEY=VALUE",
                   help="repeatable: a config override for the first of --arms (dotted KEY, YAML VALUE)")
    a.add_argument("--set-b", action="append", default=[], metavar="KEY=VALUE", help="... for the second")
    a.add_argument("--pd-config", default=None)
    a.add_argument("--mono-config", default=None)
    a.add_argument("--pd-url", default=None, help="benchmark this running P/D server instead of starting one")
    a.add_argument("--mono-url", default=None, help="benchmark this running monolithic server instead")
    a.add_argument("--out", required=True, help="report directory")
    a.add_argument("--model", default=None, help="default: the config's served_name, else GET /v1/models")
    a.add_argument("--knee-threshold", type=float, default=0.9,
                   help="share of requests within SLOs for a rate to count as sustained")
    a.add_argument("--health-timeout-s", type=float, default=60.0, help="wait this long for a --*-url's /health")
    add_workload_args(a)
    add_load_args(a, sweep_only=True)
    a.set_defaults(fn=run, num_warmups=4)


def _load(path: Optional[str], what: str) -> Optional[ClusterConfig]:
    if path is None:
        return None
    try:
        return load_config(path)
    except Exception as e:  # noqa: BLE001  (a pydantic or YAML error, shown as is)
        raise ValueError(f"bad {what} config {path}: {e}") from None


def run(args: argparse.Namespace) -> int:
    def fail(msg: str, code: int = 2) -> int:
        print(f"pdserve ab: error: {msg}", file=sys.stderr)
        return code

    problem = check_args(args)
    if problem:
        return fail(problem)
    if not 0 < args.knee_threshold <= 1:
        return fail("--knee-threshold must lie in (0, 1]")
    if args.arms is not None or args.set_a or args.set_b:
        return run_named_arms(args, fail)
    if not (args.pd_config or args.pd_url) or not (args.mono_config or args.mono_url):
        return fail("each arm needs a config or a URL: --pd-config/--pd-url and --mono-config/--mono-url")
    for flag, url in (("--pd-url", args.pd_url), ("--mono-url", args.mono_url)):
        if url is not None and not url.startswith(("http://", "https://")):
            return fail(f"{flag} {url!r} must start with http:// or https://")
    try:
        pd_cfg, mono_cfg = _load(args.pd_config, "P/D"), _load(args.mono_config, "monolithic")
    except ValueError as e:
        return fail(str(e))
    if pd_cfg is not None and pd_cfg.mode != "pd":
        return fail(f"--pd-config {args.pd_config} has mode {pd_cfg.mode!r}, not 'pd'")
    if mono_cfg is not None and mono_cfg.mode != "monolithic":
        return fail(f"--mono-config {args.mono_config} has mode {mono_cfg.mode!r}, not 'monolithic'")
    budget = "not checked (both arms are running servers and not both configs were given)"
    if pd_cfg is not None and mono_cfg is not None:
        try:
            budget = check_same_budget(pd_cfg, mono_cfg)
        except BudgetMismatch as e:
            return fail(f"refusing to compare: {e}")
    elif not (args.pd_url and args.mono_url):
        return fail("the hardware budget check needs both configs when a cluster is to be started")
    slos = parse_goodput(args.goodput) if args.goodput else config_slos(pd_cfg) if pd_cfg else {"ttft": 500.0,
                                                                                               "tpot": 50.0}
    try:
        pd = run_arm(args, "pd", args.pd_config, args.pd_url, pd_cfg, slos)
        write_json(Path(args.out) / "pd.json", pd)  # kept even if the other arm fails
        mono = run_arm(args, "monolithic", args.mono_config, args.mono_url, mono_cfg, slos)
    except ServerUnreachable as e:
        return fail(str(e), 1)
    for arm in (pd, mono):
        arm["arm"]["budget"] = budget
    from pdserve.bench.report import write_report

    summary = write_report(pd, mono, args.out, threshold=args.knee_threshold)
    return _printed(summary)


def _printed(summary: Path) -> int:
    print(f"pdserve ab: wrote {summary}")
    for line in summary.read_text().splitlines():
        if line.startswith("**Verdict:**"):
            print(line)
    return 0


def run_named_arms(args: argparse.Namespace, fail) -> int:
    """``--arms A,B`` (names or config files) with ``--set-a`` / ``--set-b`` overrides."""
    if any((args.pd_config, args.mono_config, args.pd_url, args.mono_url)):
        return fail("give --arms, or --pd-config/--pd-url and --mono-config/--mono-url, not both")
    specs = [x.strip() for x in (args.arms or "").split(",")]
    if len(specs) != 2 or not all(specs):
        return fail(f"--arms takes two arms, A,B (got {args.arms!r})")
    try:
        arms = [resolve(specs[0], args.set_a), resolve(specs[1], args.set_b)]
    except ArmError as e:
        return fail(str(e))
    if arms[0].name == arms[1].name:
        arms[0].name, arms[1].name = f"{arms[0].name}-a", f"{arms[1].name}-b"  # two files, two names
    labels = (arms[0].label, arms[1].label)
    try:
        budget = check_same_budget(arms[0].cfg, arms[1].cfg, labels)
    except BudgetMismatch as e:
        return fail(f"refusing to compare: {e}")
    slos = parse_goodput(args.goodput) if args.goodput else config_slos(arms[0].cfg)
    results = []
    try:
        for arm in arms:
            results.append(run_arm(args, arm.name, arm.config_path, None, arm.cfg, slos, config_text=arm.text,
                                   label=arm.label))
            results[-1]["arm"]["budget"] = budget
            write_json(Path(args.out) / f"{arm.name}.json", results[-1])  # kept even if the next arm fails
    except ServerUnreachable as e:
        return fail(str(e), 1)
    from pdserve.bench.report import write_report

    summary = write_report(results[0], results[1], args.out, threshold=args.knee_threshold,
                           arms=tuple((a.label, a.name) for a in arms))
    return _printed(summary)
