"""Bad configs fail at load time with a message naming the problem."""
import pytest
from pydantic import ValidationError

from pdserve.engine.config import parse_core_set
from pdserve.settings.cluster import ClusterConfig, load_config

from conftest import CONFIGS


def _pd(**over):
    base = {"mode": "pd", "prefill": {"replicas": 1, "cpu_cores": ["0"]}, "decode": {"replicas": 1, "cpu_cores": ["1"]}}
    base.update(over)
    return base


@pytest.mark.parametrize("name", ["cpu-pd.yaml", "cpu-monolithic.yaml", "gpu-pd.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.pools()


def test_shipped_pd_configs_decide_per_request_on_the_prefix_cache():
    pd_configs = [p for p in sorted(CONFIGS.glob("*.yaml")) if load_config(p).mode == "pd"]
    assert {p.name for p in pd_configs} >= {"cpu-pd.yaml", "cpu-pd-grpc.yaml", "gpu-pd.yaml", "cpu-lab-pd.yaml"}
    for path in pd_configs:
        router = load_config(path).router
        assert router.disaggregation == "adaptive", path.name
        assert all(router.selection.for_pool(p).uses("prefix") for p in ("prefill", "decode")), path.name


def test_core_sets_parse():
    assert parse_core_set("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        parse_core_set("3-1")
    with pytest.raises(ValueError):
        parse_core_set("1,1")


@pytest.mark.parametrize("data,needle", [
    (_pd(decode={"replicas": 1, "cpu_cores": ["0"]}), "core 0 is given to both"),
    (_pd(decode={"replicas": 2, "cpu_cores": ["1"]}), "replicas is 2 but there are 1 core sets"),
    (_pd(decode={"replicas": 1}), "needs cpu_cores"),
    ({"mode": "pd", "prefill": {"cpu_cores": ["0"]}}, "needs both"),
    ({"mode": "monolithic"}, "needs a 'monolithic' pool"),
    (_pd(kv_transfer={"transport": "carrier-pigeon"}), "transport"),
    (_pd(device="gpu", kv_transfer={"transport": "grpc"}), "needs device 'cpu'"),
    (_pd(router={"port": 0}), "port"),
    (_pd(bogus=1), "bogus"),
    (_pd(mode="hybrid"), "mode"),
])
def test_bad_configs_are_rejected(data, needle):
    with pytest.raises(ValidationError) as e:
        ClusterConfig.model_validate(data)
    assert needle in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_bad_config(tmp_path, capsys):
    from pdserve.cluster.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: pd\nprefill: {cpu_cores: ['0']}\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "needs both" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    ({}, "args must name the pdserve config file"),
    ({"port": 9000}, "args must name the pdserve config file"),
    ({"config": ""}, "args.config must be a file path"),
    ({"config": str(CONFIGS / "cpu-pd.yaml"), "conifg": "typo"}, "unknown args ['conifg']"),
    ({"config": str(CONFIGS / "cpu-pd.yaml"), "port": "8000"}, "port must be an integer"),
])
def test_app_builder_refuses_bad_args(args, needle):
    from pdserve.cluster.builder import app_builder

    with pytest.raises(ValueError) as e:
        app_builder(args)
    assert needle in str(e.value)


def test_app_builder_reports_a_missing_config_file(tmp_path):
    from pdserve.cluster.builder import app_builder

    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        app_builder({"config": str(tmp_path / "nope.yaml")})


def test_app_builder_applies_the_port_override():
    # Binding deployments does not start Ray; this is what Serve's build task runs.
    from pdserve.cluster.builder import app_builder

    router = app_builder({"config": str(CONFIGS / "cpu-pd.yaml"), "port": 9123})._bound_deployment
    assert router.init_args[0]["router"]["port"] == 9123
    assert router.ray_actor_options == {"num_cpus": 0}  # cpu-pd.yaml leaves the router unpinned
    with pytest.raises(ValidationError, match="router.port"):
        app_builder({"config": str(CONFIGS / "cpu-pd.yaml"), "port": 70000})


@pytest.mark.parametrize("value,needle", [
    ("router_group", "valid dictionary"),
    (["router_group"], "valid dictionary"),
    ({"router_group": "lots"}, "valid number"),
    ({"router_group": 0}, "quantities must be positive"),
])
def test_router_ray_resources_must_be_a_mapping_of_positive_quantities(value, needle):
    with pytest.raises(ValidationError) as e:
        ClusterConfig.model_validate(_pd(router={"ray_resources": value}))
    assert "router.ray_resources" in str(e.value) and needle in str(e.value)


def test_router_ray_resources_reach_the_router_replica():
    from pdserve.cluster.builder import build_app

    cfg = ClusterConfig.model_validate(_pd(router={"ray_resources": {"router_group": 0.001}}))
    assert build_app(cfg)._bound_deployment.ray_actor_options == {"num_cpus": 0, "resources": {"router_group": 0.001}}


def test_overrides_lay_dotted_yaml_values_on_the_file():
    cfg = load_config(CONFIGS / "cpu-pd.yaml", ["router.disaggregation=always", "router.selection.decode=null",
                                                "slo={ttft_ms: 300}"])
    assert cfg.router.disaggregation == "always" and cfg.slo.ttft_ms == 300 and cfg.slo.tpot_ms == 50
    assert not cfg.router.selection.for_pool("decode").uses("prefix")  # null: the pool's default pipeline
    assert cfg.router.selection.for_pool("prefill").uses("prefix")  # untouched keys stay


@pytest.mark.parametrize("override,needle", [
    ("router.disaggregation", "not KEY=VALUE"),
    ("router.disaggregation=sometimes", "disaggregation"),
    ("router.bogus=1", "bogus"),
    ("slo.ttft_ms=[", "not YAML"),
])
def test_serve_and_demo_refuse_a_bad_override_before_starting_anything(override, needle, capsys):
    from pdserve.cluster.cli import main

    for cmd in ("serve", "demo"):
        assert main([cmd, "--config", str(CONFIGS / "cpu-pd.yaml"), "--set", override]) == 2
        err = capsys.readouterr().err
        assert f"pdserve {cmd}: bad config" in err and needle in err, err
