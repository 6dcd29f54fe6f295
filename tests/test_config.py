"""Bad configs fail at load time with a message naming the problem."""
import pytest
from pydantic import ValidationError

from pdserve.engine.config import ClusterConfig, load_config, parse_core_set

from conftest import CONFIGS


def _pd(**over):
    base = {"mode": "pd", "prefill": {"replicas": 1, "cpu_cores": ["0"]}, "decode": {"replicas": 1, "cpu_cores": ["1"]}}
    base.update(over)
    return base


@pytest.mark.parametrize("name", ["cpu-pd.yaml", "cpu-monolithic.yaml", "gpu-pd.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.pools()


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
