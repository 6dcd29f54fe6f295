"""The prefix index follows a real vLLM engine's KV cache events (router/kv_event_feed.py into
router/prefix_index.py): one tiny engine (EngineServer, no Ray) with a small KV cache.

A repeated prompt matches on the engine that served it; what it served before the router
subscribed comes back through vLLM's replay socket; other prompts evict it and the match goes;
a tenant's salt never matches another's; a restarted engine (same replica, new run) starts empty.
Prompts are token ids (/v1/completions), so the test knows exactly what the engine cached.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from pdserve.router.kv_event_feed import KVEventFeed
from pdserve.router.prefix_index import PrefixIndex, PromptKeys
from pdserve.settings.cluster import ClusterConfig, load_config

pytestmark = pytest.mark.cluster

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BLOCK = 32  # vLLM's CPU attention takes multiples of 32
BLOCKS = 24  # 23 usable: a 208-token prompt caches 6 full blocks and takes a 7th while it runs
HELD = 192  # the tokens of those 6 blocks: what a repeat of the prompt finds cached


def tiny_config() -> ClusterConfig:
    raw = load_config(CONFIGS / "cpu-monolithic.yaml").model_dump()
    raw["model"].update(max_model_len=256, block_size=BLOCK)
    raw["engine"].update(kv_cache_blocks=BLOCKS, max_num_seqs=4)
    raw["router"]["selection"] = {"monolithic": {"filters": ["healthy"], "scorers": [{"name": "prefix"}]}}
    return ClusterConfig.model_validate(raw)


def prompt(seed: int, n: int = 208) -> list[int]:
    return [3 + (seed * 7919 + i * 31) % 800 for i in range(n)]  # the tiny model has 821 token ids


async def serve(engine, ids: list[int], salt: str | None = None) -> None:
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "temperature": 0}
    if salt:
        body["cache_salt"] = salt
    items = [item async for item in engine.handle("completions", body)]
    assert items[-1][0] == "json", items


async def until(check, what: str, timeout_s: float = 30.0):
    """Waits for the events to arrive (they follow the engine step by milliseconds)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def restored_env():
    saved = dict(os.environ)  # EngineServer sets the engine's environment in this process
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_the_index_follows_a_live_engines_kv_events(restored_env):
    from pdserve.engine.server import EngineServer

    cfg = tiny_config()
    assert cfg.router.needs_kv_events()

    async def scenario():
        index = PrefixIndex()
        feed = KVEventFeed(index)
        engine = EngineServer(cfg, "monolithic", 0, run_id="replica-1")
        await engine.start()
        try:
            source = engine.load()["kv_events"]
            assert source["topic"].startswith("pdserve-kv/replica-1/") and "*" not in source["endpoint"]
            early, a, b = prompt(1), prompt(2), prompt(3)
            await serve(engine, early)  # before the router subscribes: only replay can tell it
            feed.follow({"replica-1": source})
            await until(lambda: index.cached_tokens("replica-1", PromptKeys(early)) == HELD,
                        "the replayed prompt matches")
            assert feed.subscriptions["replica-1"].replayed >= 1

            await serve(engine, a)
            await until(lambda: index.cached_tokens("replica-1", PromptKeys(a)) == HELD, "a repeat of a matches")
            longer = a + prompt(9, 40)  # the next turn: a's blocks, then new ones
            assert index.cached_tokens("replica-1", PromptKeys(longer)) == HELD
            assert index.cached_tokens("another-replica", PromptKeys(a)) == 0
            assert index.cached_tokens("replica-1", PromptKeys(b)) == 0

            # tenants: the same tokens under two salts are two different prefixes
            await serve(engine, b, salt="tenant-x")
            await until(lambda: index.cached_tokens("replica-1", PromptKeys(b, "tenant-x")) == HELD, "salted match")
            assert index.cached_tokens("replica-1", PromptKeys(b, "tenant-y")) == 0
            assert index.cached_tokens("replica-1", PromptKeys(b)) == 0

            # eviction: three more prompts need 21 blocks of the 23, so the oldest cached ones go
            for seed in (4, 5, 6):
                await serve(engine, prompt(seed))
            await until(lambda: index.cached_tokens("replica-1", PromptKeys(prompt(6))) == HELD, "the last one")
            assert index.cached_tokens("replica-1", PromptKeys(a)) < HELD
            await until(lambda: index.cached_tokens("replica-1", PromptKeys(a)) == 0, "a evicted")
            assert index.resets("replica-1") == 0  # no gap was seen along the way
        finally:
            await engine.shutdown()

        # the replica's engine restarts (a new run: new endpoint and topic): the index starts empty
        engine = EngineServer(cfg, "monolithic", 0, run_id="replica-1")
        await engine.start()
        try:
            feed.follow({"replica-1": engine.load()["kv_events"]})
            assert index.cached_tokens("replica-1", PromptKeys(prompt(6))) == 0
            await serve(engine, prompt(7))
            await until(lambda: index.cached_tokens("replica-1", PromptKeys(prompt(7))) == HELD, "new run indexed")
            assert index.cached_tokens("replica-1", PromptKeys(prompt(6))) == 0
        finally:
            feed.close()
            await engine.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 600))
