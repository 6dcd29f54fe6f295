"""pdserve bench and vLLM's own benchmark client (vllm.benchmarks.serve) agree.

Both clients load the same server with the same workload (fixed input and output lengths,
the same concurrency), one after the other, in alternating rounds, so that drift on this
shared machine falls on both; the median of each client's per-round TTFT and TPOT medians (robust to one round caught in a stall)
must agree within 10 %.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap

import pytest

from pdserve.engine.tiny_model import resolve_model

# Excluded from the default run (marker 'timing', run with -m timing). 1,024-token prompts at
# 4 streams keep TTFT near 60 ms and TPOT near 4 ms, so a client's own fraction of a millisecond
# stays well under 10 % on an otherwise idle cluster (2.4 % and 2.2 % apart in a 5-round run).
# Inside the full suite the other apps and tests still move one client's TTFT median against
# the other's by about 10 % (91.4 vs 82.5 ms in a session-4 run), so it stays out of CI.
pytestmark = [pytest.mark.cluster, pytest.mark.timing]

VLLM_CLIENT = textwrap.dedent("""
    import json, sys
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    result = main(parser.parse_args(sys.argv[1:]))
    print("RESULT " + json.dumps({k: result[k] for k in ("completed", "median_ttft_ms", "median_tpot_ms")}))
""")


ROUNDS = 7


def test_pdserve_bench_agrees_with_vllm_bench_serve(clusters, tmp_path):
    url = clusters.mono_url
    n, concurrency, in_len, out_len = 32, 4, 1024, 64
    vllm_cmd = [sys.executable, "-c", VLLM_CLIENT, "--backend", "openai-chat", "--base-url", url,
                "--endpoint", "/v1/chat/completions", "--model", "tiny", "--tokenizer", resolve_model("builtin:tiny"),
                "--dataset-name", "random", "--random-input-len", str(in_len), "--random-output-len", str(out_len),
                "--num-prompts", str(n), "--max-concurrency", str(concurrency), "--request-rate", "inf",
                "--ignore-eos", "--temperature", "0", "--disable-tqdm", "--num-warmups", "2"]
    ours = tmp_path / "pdserve.json"
    pdserve_cmd = [sys.executable, "-m", "pdserve.cluster.cli", "bench", "--url", url, "--workload", "fixed",
                   "--input-len", str(in_len), "--output-len", str(out_len), "--num-prompts", str(n),
                   "--max-concurrency", str(concurrency), "--request-rate", "inf", "--num-warmups", "2",
                   "--disable-tqdm", "--result-file", str(ours)]
    # a new seed each round: new prompts, so no round is served from the prefix cache
    theirs, mine = [], []
    for round_ in range(ROUNDS):
        for cmd, sink in ((vllm_cmd, theirs), (pdserve_cmd, mine)):
            p = subprocess.run(cmd + ["--seed", str(100 + round_)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
            assert p.returncode == 0, p.stdout[-3000:]
            if sink is theirs:
                sink.append(json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:]))
            else:
                sink.append(json.loads(ours.read_text())["runs"][0])
    assert all(r["completed"] == n for r in theirs + mine)
    agg = {who: {k: statistics.median(r[k] for r in runs) for k in ("median_ttft_ms", "median_tpot_ms")}
           for who, runs in (("vllm", theirs), ("pdserve", mine))}
    print(f"\nover {ROUNDS} alternating rounds: vLLM bench serve TTFT p50 {agg['vllm']['median_ttft_ms']:.2f} ms, "
          f"TPOT p50 {agg['vllm']['median_tpot_ms']:.3f} ms; pdserve bench TTFT p50 "
          f"{agg['pdserve']['median_ttft_ms']:.2f} ms, TPOT p50 {agg['pdserve']['median_tpot_ms']:.3f} ms")
    for key in ("median_ttft_ms", "median_tpot_ms"):
        assert abs(agg["pdserve"][key] - agg["vllm"][key]) <= 0.10 * agg["vllm"][key], (key, agg)
