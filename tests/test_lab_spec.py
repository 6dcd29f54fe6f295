"""The lab section of a config, and what `pdserve lab` says where it cannot run."""
from pathlib import Path

import pytest
import yaml

from pdserve.settings.cluster import ClusterConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _lab_config(**changes) -> dict:
    data = yaml.safe_load((CONFIGS / "cpu-lab-pd.yaml").read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = data
        for key in path:
            node = node[key]
        node[last] = value
    return data


@pytest.mark.parametrize("name", ["cpu-lab-pd.yaml", "cpu-lab-pd-grpc.yaml"])
def test_shipped_lab_configs_load_with_three_hosts(name):
    cfg = load_config(CONFIGS / name)
    assert [h.name for h in cfg.lab.hosts] == ["head", "prefill", "decode"]
    assert cfg.lab.head.name == "head"
    assert [cfg.lab.address_of(h) for h in ("head", "prefill", "decode")] == ["10.77.0.2", "10.77.0.3", "10.77.0.4"]
    assert cfg.lab.bridge_address() == "10.77.0.1"


def test_the_two_lab_configs_can_share_one_lab():
    nixl, grpc = (load_config(CONFIGS / n) for n in ("cpu-lab-pd.yaml", "cpu-lab-pd-grpc.yaml"))
    assert nixl.lab == grpc.lab
    assert nixl.name != grpc.name and nixl.router.port != grpc.router.port
    assert nixl.kv_transfer.side_channel_base_port != grpc.kv_transfer.side_channel_base_port


def test_a_pool_asking_for_a_resource_no_host_offers_fails():
    data = _lab_config(**{"decode.ray_resources": {"gpu_host": 1}})
    with pytest.raises(ValueError, match=r"decode pool asks for Ray resources \['gpu_host'\]"):
        ClusterConfig.model_validate(data)


def test_a_lab_router_on_loopback_fails():
    with pytest.raises(ValueError, match="router.host must not be loopback"):
        ClusterConfig.model_validate(_lab_config(**{"router.host": "127.0.0.1", "admin.key": None}))


@pytest.mark.parametrize("hosts, message", [
    ([{"name": "a"}, {"name": "b"}], "exactly one host must be the head"),
    ([{"name": "a", "head": True}, {"name": "a"}], "a name appears twice"),
    ([{"name": "Prefill-1", "head": True}], "lowercase letters and digits"),
    ([{"name": "averyverylonghost", "head": True}], "1-11"),
])
def test_bad_lab_hosts_fail_with_a_message(hosts, message):
    from pdserve.lab.spec import LabSpec

    with pytest.raises(ValueError, match=message):
        LabSpec(hosts=hosts)


def test_a_public_subnet_is_refused():
    from pdserve.lab.spec import LabSpec

    with pytest.raises(ValueError, match="not a private network"):
        LabSpec(subnet="8.8.8.0/24", hosts=[{"name": "h", "head": True}])


def test_lab_up_without_root_fails_at_once_saying_so(monkeypatch, capsys, tmp_path):
    from pdserve.cluster.cli import main

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("PDSERVE_LAB_DIR", str(tmp_path / "lab"))
    assert main(["lab", "up", "--config", str(CONFIGS / "cpu-lab-pd.yaml")]) == 1
    err = capsys.readouterr().err
    assert "needs root" in err and "CAP_NET_ADMIN" in err
    assert not (tmp_path / "lab").exists()


def test_lab_up_from_a_config_without_a_lab_section_names_it(capsys):
    from pdserve.cluster.cli import main

    assert main(["lab", "up", "--config", str(CONFIGS / "cpu-pd.yaml")]) == 2
    assert "has no 'lab' section" in capsys.readouterr().err


def test_lab_commands_without_a_lab_say_how_to_start_one(monkeypatch, capsys, tmp_path):
    from pdserve.cluster.cli import main

    monkeypatch.setenv("PDSERVE_LAB_DIR", str(tmp_path / "none"))
    assert main(["lab", "kill-host", "decode"]) == 1
    assert "no lab is up" in capsys.readouterr().err


def test_serve_detach_needs_an_address(capsys):
    from pdserve.cluster.cli import main

    assert main(["serve", "--config", str(CONFIGS / "cpu-pd.yaml"), "--detach"]) == 2
    assert "--detach needs --address" in capsys.readouterr().err


def test_lab_refuses_code_under_tmp_which_each_host_replaces():
    from pdserve.lab.errors import LabError
    from pdserve.lab.hosts import require_code_outside_tmp

    with pytest.raises(LabError, match="under /tmp"):
        require_code_outside_tmp(["/work/x/.venv/bin/python", "/tmp/clone/.venv"])
    require_code_outside_tmp(["/work/x/.venv/bin/python", "/var/tmp/clone/.venv", "/tmpfoo/bin/python"])
