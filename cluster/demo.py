"""``pdserve demo``: bring up a cluster and talk to it with the official openai client."""
from __future__ import annotations

import signal
import sys
import threading
import time


def run_demo(config_path: str, port: int | None, exit_after: bool, overrides: list[str] = ()) -> int:
    from openai import OpenAI

    from pdserve.cluster.runtime import start_cluster, stop_cluster
    from pdserve.settings.cluster import load_config

    try:
        cfg = load_config(config_path, overrides)
    except Exception as e:
        print(f"pdserve demo: bad config {config_path}: {e}", file=sys.stderr)
        return 2
    print(f"pdserve demo: starting a {cfg.mode} cluster from {config_path} (first start builds the tiny model "
          "and takes about a minute)", flush=True)
    t0 = time.time()
    url = start_cluster(cfg, port=port)
    print(f"pdserve demo: cluster ready in {time.time() - t0:.0f}s at {url}/v1", flush=True)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="not-needed")
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Explain prefill/decode disaggregation in one sentence."}]
        raw = client.chat.completions.with_raw_response.create(model=cfg.model.served_name, messages=messages,
                                                               max_tokens=24, temperature=0)
        full = raw.parse()
        decision = raw.headers.get("x-pdserve-decision")
        print("\n--- non-streamed chat completion "
              f"(x-pdserve-path: {raw.headers.get('x-pdserve-path')}"
              + (f", x-pdserve-decision: {decision}" if decision else "") + ") ---")
        print(f"content: {full.choices[0].message.content!r}")
        print(f"finish_reason={full.choices[0].finish_reason} usage={full.usage.model_dump(exclude_none=True)}")
        print("\n--- streamed chat completion ---")
        stream = client.chat.completions.create(model=cfg.model.served_name, messages=messages, max_tokens=24,
                                                temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print("\n\n(the tiny model has random weights: the words are noise, the serving path is real)")
        from pdserve.cluster.cli import main as cli_main

        cli_main(["status", "--url", url])
        if exit_after:
            return 0
        print(f"\npdserve demo: serving at {url}/v1 until Ctrl-C", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        print("pdserve demo: shutting down", flush=True)
        stop_cluster()


if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1], None, "--exit" in sys.argv))
