"""The deployment artifacts in configs/: Prometheus alert rules, KubeRay manifests, Grafana dashboard.

* Alert rules go through ``promtool check rules`` and their unit tests through ``promtool test
  rules``. promtool ships in Debian's ``prometheus`` package; no PyPI package carries it.
  ``make setup`` puts it at .cache/bin/promtool (tools/fetch_promtool.sh: a link to the promtool
  on PATH, or the binary unpacked from the package, nothing installed). The tests take $PROMTOOL,
  else that cached binary, else promtool on PATH, and fail, saying how to get it, without one.
* Core Kubernetes objects and the RayService's pod templates are validated against Kubernetes'
  OpenAPI schemas (``kubernetes-validate``, strict: unknown fields fail). The RayService itself
  is validated against tests/schemas/rayservice-v1.minimal.schema.json, a schema of the fields
  we use written for this project (no package reachable from here ships KubeRay's CRDs). Its
  serveConfigV2 is parsed with Ray's own ``ServeDeploySchema``, its import path resolved, and the
  application built from it the way Serve's build task does (binding deployments starts no Ray).
* Every metric the dashboard queries must be one the router exports (or is about to).
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
ALERTS = CONFIGS / "prometheus" / "pdserve-alerts.yml"
ALERT_TESTS = CONFIGS / "prometheus" / "pdserve-alerts.test.yml"
DASHBOARD = CONFIGS / "grafana" / "pdserve-dashboard.json"
RAYSERVICE = CONFIGS / "kuberay" / "pdserve-rayservice.yaml"
SECRET = CONFIGS / "kuberay" / "pdserve-admin-secret.example.yaml"
RAYSERVICE_SCHEMA = Path(__file__).parent / "schemas" / "rayservice-v1.minimal.schema.json"
K8S_VERSION = "1.30"

HISTOGRAMS = {"pdserve_ttft_seconds", "pdserve_tpot_seconds", "pdserve_e2e_seconds",
              "pdserve_ttft_breakdown_seconds", "pdserve_kv_transfer_seconds", "pdserve_queue_wait_seconds"}
METRICS = HISTOGRAMS | {
    "pdserve_requests_total", "pdserve_kv_transfer_bytes_total", "pdserve_kv_transfer_failures_total",
    "pdserve_fallback_total", "pdserve_link_breaker_state", "pdserve_replica_running", "pdserve_replica_waiting",
    "pdserve_replica_kv_cache_usage", "pdserve_replica_preemptions_total", "pdserve_goodput_requests_total",
    "pdserve_slo_requests_total", "pdserve_goodput_rps", "pdserve_degradation_rung", "pdserve_admission_total",
    "pdserve_autoscaler_target_replicas",
}
EXTERNAL_ALERT_METRICS = {"DCGM_FI_DEV_XID_ERRORS"}  # NVIDIA dcgm-exporter


# --- promtool -------------------------------------------------------------------------------

PROMTOOL_CACHE = ROOT / ".cache" / "bin" / "promtool"  # the Makefile's PROMTOOL_CACHE


@pytest.fixture(scope="session")
def promtool() -> str:
    env = os.environ.get("PROMTOOL")
    if env:
        if not os.access(env, os.X_OK):
            pytest.fail(f"$PROMTOOL={env} is not an executable file")
        return env
    if PROMTOOL_CACHE.is_file() and os.access(PROMTOOL_CACHE, os.X_OK):
        return str(PROMTOOL_CACHE)
    found = shutil.which("promtool")
    if found:
        return found
    pytest.fail(f"promtool not found: not in $PROMTOOL, at {PROMTOOL_CACHE.relative_to(ROOT)} or on PATH. "
                "`make setup` (or `make promtool`) caches it from Debian's prometheus package; "
                "elsewhere install Prometheus' promtool and set PROMTOOL.")


def _promtool(promtool: str, *args: str, cwd: Path = ROOT) -> str:
    r = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"promtool {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_alert_rules_pass_promtool_check(promtool):
    out = _promtool(promtool, "check", "rules", str(ALERTS))
    assert "SUCCESS" in out


def test_alert_rule_unit_tests_fire(promtool):
    _promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    # Grafana's variables substituted, each query becomes a recording rule promtool parses.
    rules = [{"record": f"pdserve:dashboard_query_{i}", "expr": _substitute(e)}
             for i, e in enumerate(_dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool(promtool, "check", "rules", str(path))


# --- PromQL helpers -------------------------------------------------------------------------

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
    "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "abs",
    "clamp", "clamp_min", "clamp_max", "vector", "scalar", "absent", "changes", "resets", "round", "ceil",
    "floor", "label_replace", "label_join", "sort", "sort_desc", "time", "timestamp", "predict_linear",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
    "last_over_time", "quantile_over_time", "inf", "nan",
}


def _substitute(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$", "")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, label matchers, ranges and grouping removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\boffset\s+\d+[smhdwy]", "", e)
    names = set(re.findall(r"(?<![\w.$])[A-Za-z_:][\w:]*", e))
    return {n for n in names if n.lower() not in _PROMQL_WORDS}


def _base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.95, sum by (le, path) (rate(pdserve_ttft_seconds_bucket'
                        '{path=~"$path"}[$__rate_interval])))') == {"pdserve_ttft_seconds_bucket"}
    assert metric_names("sum(pdserve_goodput_rps) < 0.7 * sum(pdserve_goodput_rps offset 1h) and "
                        "sum(rate(pdserve_requests_total[5m])) > 1e3") == {"pdserve_goodput_rps",
                                                                           "pdserve_requests_total"}


# --- alerts (no promtool needed) ------------------------------------------------------------

def _alerts() -> dict[str, dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_alerts_cover_the_playbook_and_carry_runbooks():
    alerts = _alerts()
    ttft = alerts["PdserveTTFTP95AboveSLO"]
    assert "histogram_quantile(0.95" in ttft["expr"] and "pdserve_ttft_seconds_bucket" in ttft["expr"]
    assert "> 0.5" in ttft["expr"] and ttft["for"] == "5m"
    queue = alerts["PdserveQueueBound"]
    assert "> 2 * sum by (pool) (pdserve_replica_running)" in queue["expr"] and queue["for"] == "5m"
    assert "> 0.92" in alerts["PdserveKVCacheNearlyFull"]["expr"]
    assert "pdserve_fallback_total" in alerts["PdserveFallbackRateHigh"]["expr"]
    assert "offset 1h" in alerts["PdserveGoodputDrop"]["expr"]
    assert 'met="true"' in alerts["PdserveGoodputRatioLow"]["expr"]
    assert "GPUXidError" in alerts
    for name, rule in alerts.items():
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert rule["labels"]["severity"] in {"page", "warning"}, name


def test_alerts_use_only_known_metrics():
    for name, rule in _alerts().items():
        unknown = {_base(m) for m in metric_names(rule["expr"])} - METRICS - EXTERNAL_ALERT_METRICS
        assert not unknown, f"{name} uses unknown metrics {unknown}"


# --- Kubernetes manifests -------------------------------------------------------------------

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(kind: str) -> list[dict]:
    return [d for d in _docs(RAYSERVICE) + _docs(SECRET) if d["kind"] == kind]


def _rayservice() -> dict:
    (rs,) = _by_kind("RayService")
    return rs


def _templates() -> dict[str, dict]:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return out


def test_manifests_hold_the_expected_objects():
    kinds = sorted(d["kind"] for d in _docs(RAYSERVICE) + _docs(SECRET))
    assert kinds == ["ConfigMap", "PodDisruptionBudget", "PodDisruptionBudget", "RayService", "Secret", "Service"]


@pytest.mark.parametrize("kind", ["ConfigMap", "Secret", "Service", "PodDisruptionBudget"])
def test_core_objects_match_the_kubernetes_schema(kind):
    for doc in _by_kind(kind):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_object_is_rejected():
    (pdb, _) = _by_kind("PodDisruptionBudget")
    bad = json.loads(json.dumps(pdb))
    bad["spec"]["maxUnavaliable"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_rayservice_matches_its_schema():
    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(_rayservice(), schema, cls=jsonschema.Draft202012Validator)
    bad = json.loads(json.dumps(_rayservice()))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft202012Validator)
    no_serve_config = json.loads(json.dumps(_rayservice()))
    del no_serve_config["spec"]["serveConfigV2"]
    with pytest.raises(jsonschema.ValidationError, match="serveConfigV2"):
        jsonschema.validate(no_serve_config, schema, cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("group", ["head", "router", "prefill", "decode"])
def test_pod_templates_match_the_kubernetes_schema(group):
    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"pdserve-{group}"},
           "template": _templates()[group]}
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_rayservice_follows_kuberays_own_rules():
    # What KubeRay's validation rejects beyond the schema (ray-operator utils/validation.go).
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for g in groups:
        assert not (g.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(g["rayStartParams"]))
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    assert not cluster["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name")


def _gpu_config() -> dict:
    return yaml.safe_load((CONFIGS / "gpu-pd.yaml").read_text())


def test_configmap_carries_the_gpu_config_unchanged(tmp_path):
    from pdserve.settings.cluster import load_config

    (cm,) = _by_kind("ConfigMap")
    text = cm["data"]["gpu-pd.yaml"]
    assert yaml.safe_load(text) == _gpu_config(), "configs/kuberay ConfigMap drifted from configs/gpu-pd.yaml"
    (tmp_path / "gpu-pd.yaml").write_text(text)
    load_config(tmp_path / "gpu-pd.yaml")


def _ray_resources(group: dict) -> dict:
    raw = group["rayStartParams"].get("resources", '"{}"')
    return json.loads(json.loads(raw))  # KubeRay's format: a JSON object inside a quoted string


def test_worker_groups_provide_what_the_pools_ask_for():
    cfg = _gpu_config()
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    workers = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(workers) == {"router", "prefill", "decode"}
    node_groups = set()
    for pool in ("prefill", "decode"):
        g, spec = workers[pool], cfg[pool]
        (container,) = g["template"]["spec"]["containers"]
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        provided = _ray_resources(g)
        for res, per_replica in spec["ray_resources"].items():
            assert provided.get(res) == gpus * per_replica / spec["gpus_per_replica"], (pool, res)
        replicas_fit = g["replicas"] * gpus // spec["gpus_per_replica"]
        assert replicas_fit >= spec["replicas"], f"{pool}: {g['replicas']} pods hold {replicas_fit} replicas"
        pod = g["template"]["spec"]
        node_groups.add(tuple(sorted(pod["nodeSelector"].items())))
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert len(node_groups) == 2, "prefill and decode must land on separate node groups"
    assert not _ray_resources(cluster["headGroupSpec"]).keys() & {"prefill_group", "decode_group"}


def test_every_container_gets_the_admin_key_from_a_secret():
    (secret,) = _by_kind("Secret")
    for group, t in _templates().items():
        for c in t["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            ref = env["PDSERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], group
            assert not ref.get("optional"), group
    assert _gpu_config()["admin"]["key_env"] == "PDSERVE_ADMIN_KEY"


def _router_group_name() -> str:
    """The group whose pods advertise every custom resource the router replica asks for."""
    asked = _gpu_config()["router"]["ray_resources"]
    assert asked, "gpu-pd.yaml must pin the router (router.ray_resources)"
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    holders = [name for name, g in groups.items() if set(asked) & set(_ray_resources(g))]
    assert len(holders) == 1, f"router resources {sorted(asked)} advertised by {holders}: the router must have one home"
    (name,) = holders
    g = groups[name]
    provided = _ray_resources(g)
    for res, qty in asked.items():
        assert provided.get(res, 0) >= qty, (name, res)
    if name != "head":
        assert g["minReplicas"] >= 1, "the router's group must always have a pod"
    return name


def test_router_is_pinned_where_its_port_probes_and_service_are():
    home = _router_group_name()
    assert home == "router"
    templates = _templates()
    (c,) = templates[home]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["router"] == _gpu_config()["router"]["port"]
    (svc,) = _by_kind("Service")
    selected = [g for g, t in templates.items() if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
    assert selected == [home]
    assert templates[home]["metadata"]["annotations"]["prometheus.io/port"] == str(_gpu_config()["router"]["port"])


def test_probes_and_drain_hooks():
    cfg = _gpu_config()
    templates = _templates()
    port = cfg["router"]["port"]
    (router,) = templates[_router_group_name()]["spec"]["containers"]
    startup = "\n".join(router["startupProbe"]["exec"]["command"])
    assert "/v1/completions" in startup and '"max_tokens": 1' in startup
    assert f'"model": "{cfg["model"]["served_name"]}"' in startup
    assert f":{port}/" in startup
    assert router["readinessProbe"]["httpGet"] == {"path": "/health", "port": port}
    assert router["livenessProbe"]["httpGet"]["path"] != "/health"  # a lost pool must not restart the router
    assert "pdserve_inflight_requests" in "\n".join(router["lifecycle"]["preStop"]["exec"]["command"])
    wait = 5 + 100  # the drain hook's sleep plus its deadline
    assert templates["router"]["spec"]["terminationGracePeriodSeconds"] > wait
    # KubeRay submits serveConfigV2 only once the head Pod is Ready: no head probe may wait for
    # the application (the router's port), or the head never turns Ready and nothing deploys.
    (head,) = templates["head"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        action = head[probe]
        assert action["httpGet"]["port"] == 8265 and action["httpGet"]["path"] == "/api/gcs_healthz", probe
    # Every pod runs just Ray, started by KubeRay's generated command.
    for group, t in templates.items():
        for c in t["spec"]["containers"]:
            assert "command" not in c and "args" not in c, group
        assert "ray.io/overwrite-container-cmd" not in t["metadata"].get("annotations", {}), group
    assert "pdserve serve" not in RAYSERVICE.read_text()
    for group in ("prefill", "decode"):
        (c,) = templates[group]["spec"]["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, (group, probe)
        hook = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
        assert "ray drain-node" in hook
        wait = int(re.search(r"sleep (\d+)", hook).group(1))
        assert templates[group]["spec"]["terminationGracePeriodSeconds"] > wait


def test_disruption_budgets_and_service_select_the_pods():
    templates = _templates()
    pdbs = {p["metadata"]["name"]: p for p in _by_kind("PodDisruptionBudget")}
    for group in ("prefill", "decode"):
        labels = templates[group]["metadata"]["labels"]
        selected = [g for g, t in templates.items()
                    if pdbs[f"pdserve-{group}"]["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()]
        assert selected == [group]
        assert labels["app.kubernetes.io/component"] == group
    (svc,) = _by_kind("Service")
    selected = [g for g, t in templates.items() if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
    assert selected == ["router"]
    (port,) = svc["spec"]["ports"]
    (router,) = templates["router"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in router["ports"]}[port["targetPort"]] == _gpu_config()["router"]["port"]


def _serve_config() -> dict:
    return yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])


def test_serve_config_parses_with_rays_own_schema():
    from ray._common.utils import import_attr
    from ray.serve.config import ProxyLocation
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(_serve_config())
    # The router serves HTTP itself; a Serve proxy would only fight it for router.port.
    assert schema.proxy_location == ProxyLocation.Disabled
    (app,) = schema.applications
    assert app.route_prefix is None
    builder = import_attr(app.import_path)
    assert callable(builder)
    # Ray Serve calls a builder with exactly one parameter, the args mapping.
    assert len(inspect.signature(builder).parameters) == 1
    # args.config is the ConfigMap's gpu-pd.yaml, mounted where Serve may build the app: any pod.
    (cm,) = _by_kind("ConfigMap")
    mount_dir, key = app.args["config"].rsplit("/", 1)
    assert key in cm["data"]
    for group, t in _templates().items():
        volumes = {v["name"]: v for v in t["spec"]["volumes"]}
        (c,) = t["spec"]["containers"]
        mounts = [m for m in c["volumeMounts"] if m["mountPath"] == mount_dir]
        assert len(mounts) == 1, group
        assert volumes[mounts[0]["name"]]["configMap"]["name"] == cm["metadata"]["name"], group
    with pytest.raises(ValueError):
        ServeDeploySchema.model_validate({**_serve_config(), "proxy_location": "Nowhere"})


def test_serve_config_builds_the_app_without_ray(tmp_path):
    """What Ray Serve's build task does with serveConfigV2, minus deploying: no Ray is started."""
    import ray
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    (cm,) = _by_kind("ConfigMap")
    (app,) = _serve_config()["applications"]
    key = app["args"]["config"].rsplit("/", 1)[1]
    (tmp_path / key).write_text(cm["data"][key])
    args = {**app["args"], "config": str(tmp_path / key)}
    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), args)
    router = built._bound_deployment
    assert router.name == "router"
    assert router.ray_actor_options == {"num_cpus": 0, "resources": _gpu_config()["router"]["ray_resources"]}
    assert set(router.init_kwargs) == {"prefill", "decode"}
    assert not ray.is_initialized()


# --- Grafana dashboard ----------------------------------------------------------------------

def _panels(items: list[dict]) -> list[dict]:
    out = []
    for p in items:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels(_dashboard()["panels"]) for t in p.get("targets", []) if t.get("expr")]


def test_dashboard_uses_only_exported_metrics():
    used = set()
    for expr in _dashboard_exprs():
        for name in metric_names(expr):
            if name.endswith("_bucket"):
                assert _base(name) in HISTOGRAMS, f"{name}: _bucket of a metric that is not a histogram"
            used.add(_base(name))
    unknown = used - METRICS
    assert not unknown, f"dashboard queries unknown metrics: {sorted(unknown)}"
    assert len(used) >= 15


def test_dashboard_has_the_panels_operators_need():
    d = _dashboard()
    panels = _panels(d["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in panels)
    for needle in ("TTFT p50 / p95 by path", "TPOT p50 / p95 by path", "E2E p50 / p95 by path", "Goodput",
                   "Fallback rate", "KV-cache usage", "Link breaker state", "Degradation rung", "Admissions"):
        assert needle in titles
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    names = {v["name"] for v in d["templating"]["list"]}
    for expr in _dashboard_exprs():
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in names, f"undefined variable ${var}"
