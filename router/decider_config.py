"""The `router.disaggregation` and `router.decider` settings: whether a P/D cluster splits a
request into a prefill and a decode leg (router/decider.py).

* ``always``: every request P/D (the default);
* ``never``: every request whole on a decode engine (prefilled there), a prefill engine if no
  decode engine is healthy;
* ``adaptive``: per request, from live measurements (router/measure.py): whole on the chosen
  decode engine or on the chosen prefill engine (of those that meet the SLOs, the one that adds
  the least latency, counting what each caches and runs), or
  P/D when neither whole way meets them. Both pools' engines then serve whole requests, so
  admission counts both pools' sequences as capacity.

This module imports only pydantic, so any layer may read it (tests/test_import_contract.py).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

Disaggregation = Literal["always", "never", "adaptive"]


class DeciderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Each new observation weighs this much in the moving averages the decider reads: 0.05 keeps
    # about the last 20-40 (a second or two at tens of requests a second). Single TTFTs and TPOTs
    # vary by 2x with queues and batches; a line fitted over a handful of them swings with it.
    ewma_alpha: float = Field(0.05, gt=0, le=1)
    # The decider keeps P/D until it has seen this many prefills, KV transfers and decodes.
    min_samples: int = Field(3, ge=1)
    # A way meets an SLO when its prediction is within this share of it: room for the
    # prediction's error.
    slo_headroom: float = Field(0.8, gt=0, le=1)
    # A prefill engine has room for a whole request while it has fewer requests than this
    # (running and queued, or this router's calls in flight if more) and its KV cache usage is
    # below router.decode_kv_headroom. Unset: engine.max_num_seqs, what a decode engine may run
    # (a lower bound leaves the decode engine every request past it: past the knee it ran half
    # as many again as the prefill engine). 0: never whole on a prefill engine. The decider's
    # predictions already count what a prefill engine runs; this only bounds it.
    prefill_whole_max_running: Optional[int] = Field(None, ge=0)
    # Two whole ways that both miss the SLOs with largest prediction-to-SLO ratios closer than
    # this are a tie: the engine with fewer requests takes the request (0: the smaller miss
    # always wins).
    whole_tie_margin: float = Field(0.05, ge=0, le=1)
