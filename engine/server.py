"""One vLLM engine with vLLM's own OpenAI serving layer, in-process.

``EngineServer`` is what a prefill, decode or monolithic replica owns. It is plain
Python (no Ray), so it can be started and tested on its own. Requests come in as
OpenAI JSON bodies and go out as a stream of ``Item`` tuples:

* ``("json", body)``: a complete non-streaming response;
* ``("error", status, body)``: an OpenAI error body with its HTTP status;
* ``("sse", text)``: one server-sent-event chunk, exactly as vLLM's server writes it;
* ``("head", {})``: the request is a stream and vLLM accepted it (sent before the engine's
  first output), so the router can answer the client's HTTP status and headers while the
  engine prefills, as vLLM's server does. Not sent ahead of a P/D decode leg's stream: its
  headers wait for the KV pull's report, which the first token brings.

Formatting, validation and chat templating are vLLM's (``OpenAIServingChat`` /
``OpenAIServingCompletion``), so responses match ``vllm serve`` by construction.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
from typing import Any, AsyncIterator, Literal, Optional

from pdserve.engine.errors import error_body, vllm_error, vllm_model_error
from pdserve.engine.stats import LoadTracker, stat_logger_factory
from pdserve.engine.tiny_model import resolve_model
from pdserve.kv_transfer import nixl_internals, vllm_internals
from pdserve.kv_transfer.faults import FaultSwitch, fault_file_path, remove_faults, write_faults
from pdserve.settings.cluster import ClusterConfig

logger = logging.getLogger("pdserve.engine")

Role = Literal["prefill", "decode", "monolithic"]
Item = tuple

# Side-channel port offsets keep every engine's NIXL handshake port unique on a node.
_PORT_OFFSET = {"prefill": 0, "decode": 100, "monolithic": 200}


def confine_engine_to_cores(cores: Optional[list[int]]) -> None:
    """Run the engine processes this process spawns on ``cores`` (see child_guard/).

    vLLM's CPU backend otherwise spins OpenMP threads on every core, and two engines
    on 'auto' binding slowed P/D about 100x on a 2-core machine.
    """
    if not cores:
        return
    core_list = ",".join(str(c) for c in cores)
    os.environ["PDSERVE_CORE_SET"] = core_list
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = core_list
    # Idle OpenMP threads sleep instead of spinning, so a mostly idle engine (prefill
    # under chat traffic) leaves its core to the serving processes that float.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def side_channel_port(cfg: ClusterConfig, role: Role, index: int) -> int:
    return cfg.kv_transfer.side_channel_base_port + _PORT_OFFSET[role] + index


def kv_events_fields(topic: str, endpoint: str = "tcp://*:0", replay_endpoint: str = "tcp://*:0") -> dict[str, Any]:
    """vLLM's ``kv_events_config`` as an engine replica publishes its KV cache events: vLLM's
    ZMQ publisher, with a replay endpoint for a subscriber that missed a batch. Port 0 on the
    wildcard: vLLM binds VLLM_HOST_IP (the replica's address) on a free port and reports the
    endpoints back (``EngineServer._read_kv_events_source``)."""
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint,
            "replay_endpoint": replay_endpoint, "topic": topic}


def serving_args(cfg: ClusterConfig, model_path: str) -> list[str]:
    """vLLM's OpenAI serving layer's command line, as `vllm serve` would take it for this config."""
    args = ["--model", model_path, "--served-model-name", cfg.model.served_name, "--enable-prompt-tokens-details"]
    e = cfg.engine
    if e.chat_template:
        args += ["--chat-template", e.chat_template]
    if e.tool_call_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", e.tool_call_parser]
    if e.reasoning_parser:
        args += ["--reasoning-parser", e.reasoning_parser]
    return args


class EngineServer:
    """``run_id`` names this run of the engine (a replica passes its Ray Serve replica id;
    default: a fresh random id): its fault switch belongs to that run alone
    (kv_transfer/faults.py). ``host`` is the address other engines reach this one at (its
    NIXL side channel, its gRPC KV endpoint): a replica passes ``advertised_address()``;
    the default, loopback, is for an engine run on its own, without Ray, on one host."""

    def __init__(self, cfg: ClusterConfig, role: Role, index: int, *, run_id: Optional[str] = None,
                 host: str = "127.0.0.1", kv_events: Optional[bool] = None) -> None:
        run_id = run_id or f"{os.getpid()}-{secrets.token_hex(4)}"
        # KV cache events for the router's prefix index (router/prefix_index.py), when it reads
        # them. The topic names this engine run, so a subscriber never mixes two runs' events.
        self.publishes_kv_events = cfg.router.needs_kv_events() if kv_events is None else kv_events
        self.kv_events_topic = f"pdserve-kv/{run_id}/{secrets.token_hex(4)}"
        self.kv_events_source: Optional[dict[str, Any]] = None
        self.cfg = cfg
        self.host = host
        self.role = role
        self.index = index
        self.tracker = LoadTracker()
        self.engine = None
        self._chat = None
        self._completion = None
        self.cores = None
        if cfg.device == "cpu":
            pool = cfg.pools()[role]
            self.cores = pool.cores_for(index)
        self.kv_port = side_channel_port(cfg, role, index) if role != "monolithic" else None
        self.fault_file = fault_file_path(cfg.name, role, index, run_id) if role != "monolithic" else None
        self._faults = FaultSwitch(self.fault_file)

    # ------------------------------------------------------------------ start-up
    def _engine_args(self):
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        cfg = self.cfg
        m = cfg.model
        pool = cfg.pools()[self.role]
        model_path = resolve_model(m.path)
        kv_config = None
        if self.role != "monolithic":
            from pdserve.kv_transfer.registry import kv_transfer_config_for

            kv_config = KVTransferConfig(**kv_transfer_config_for(
                cfg, self.role, port=self.kv_port, host=self.host, fault_file=self.fault_file))
        kv_events = None
        if self.publishes_kv_events:
            from vllm.config import KVEventsConfig

            kv_events = KVEventsConfig(**kv_events_fields(self.kv_events_topic))
        return AsyncEngineArgs(
            model=model_path,
            tokenizer=model_path,
            served_model_name=[m.served_name],
            load_format=m.load_format,
            dtype=m.dtype,
            max_model_len=m.max_model_len,
            block_size=m.block_size,
            seed=m.seed,
            tensor_parallel_size=pool.tensor_parallel_size,
            max_num_seqs=cfg.engine.max_num_seqs,
            max_num_batched_tokens=cfg.engine.max_num_batched_tokens,
            enforce_eager=cfg.engine.enforce_eager,
            enable_prefix_caching=cfg.engine.enable_prefix_caching,
            gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
            num_gpu_blocks_override=cfg.engine.kv_cache_blocks,
            scheduling_policy=cfg.engine.scheduling_policy,
            kv_transfer_config=kv_config,
            kv_events_config=kv_events,
            disable_log_stats=False,
            **cfg.engine.engine_kwargs,
        )

    def _set_env(self) -> None:
        guard = os.path.join(os.path.dirname(__file__), "child_guard")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (guard, os.environ.get("PYTHONPATH")) if p)
        os.environ["PDSERVE_DIE_WITH_PARENT"] = "1"
        # vLLM's own guess (a UDP route to a public address) fails on a host without a default
        # route and falls back to 0.0.0.0; the replica's advertised address is the right one.
        os.environ.setdefault("VLLM_HOST_IP", self.host)
        if self.cfg.device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.engine.cpu_kv_cache_gib)
            confine_engine_to_cores(self.cores)
            os.environ["PDSERVE_CPU_NO_AMX"] = "0" if self.cfg.engine.cpu_amx_attention else "1"
            os.environ["PDSERVE_MQ_NO_SPIN"] = "1"  # see child_guard/sitecustomize.py, item 4
        if self.kv_port is not None:
            os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(self.kv_port)
            os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", self.host)

    async def start(self) -> None:
        # pdserve reaches into vLLM's and NIXL's internals (listed in kv_transfer/vllm_internals.py and
        # nixl_internals.py): an untested version fails here, by name, not at the first request.
        vllm_internals.check_version()
        nixl_internals.check_version(required=self.role != "monolithic" and self.cfg.kv_transfer.transport == "nixl")
        remove_faults(self.fault_file)  # no run starts with faults; only this run's chaos calls set them
        self._set_env()
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self._engine_args()
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(self.tracker)])
        self.kv_events_source = self._read_kv_events_source()
        await self._init_serving(args.model)
        logger.info("%s[%d] engine ready (cores=%s, kv_port=%s)", self.role, self.index, self.cores, self.kv_port)

    def _read_kv_events_source(self) -> Optional[dict[str, Any]]:
        """Where this engine publishes its KV cache events, as vLLM bound them (None if it does not)."""
        if not self.publishes_kv_events:
            return None
        sources = self.engine.get_kv_event_sources()  # {data-parallel rank: resolved KVEventsConfig}
        src = sources.get(0) if sources else None
        if src is None or not src.endpoint or "*" in src.endpoint:
            logger.warning("%s[%d]: the engine reported no KV event endpoint; the router sees no prefix hits here",
                           self.role, self.index)
            return None
        return {"endpoint": src.endpoint, "replay_endpoint": src.replay_endpoint, "topic": src.topic}

    async def _init_serving(self, model_path: str) -> None:
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parser = make_arg_parser(FlexibleArgumentParser())
        args = parser.parse_args(serving_args(self.cfg, model_path))
        state = State()
        tasks = await self.engine.get_supported_tasks()
        await init_app_state(self.engine, state, args, tasks)
        self._chat = state.openai_serving_chat
        self._completion = state.openai_serving_completion

    async def shutdown(self) -> None:
        remove_faults(self.fault_file)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    # ------------------------------------------------------------------ serving
    async def handle(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[Item]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from pydantic import ValidationError
        from vllm.exceptions import VLLMClientError

        try:
            if endpoint == "chat":
                request = ChatCompletionRequest.model_validate(body)
                result = await self._chat.create_chat_completion(request, None)
            elif endpoint == "completions":
                request = CompletionRequest.model_validate(body)
                result = await self._completion.create_completion(request, None)
            else:
                yield ("error", 404, error_body(404, f"unknown endpoint {endpoint!r}", "NotFoundError"))
                return
        except ValidationError as e:
            yield ("error", *vllm_model_error(e))
            return
        except (VLLMClientError, ValueError, TypeError, OverflowError) as e:
            # The client's fault, worded as vLLM's server words it (its param kept); an engine's
            # own failure propagates, so the router falls back or resumes.
            yield ("error", *vllm_error(e))
            return

        if isinstance(result, ErrorResponse):
            err = result.error
            yield ("error", int(err.code), result.model_dump())
        elif hasattr(result, "model_dump"):
            # Before the answer: the router stops reading a non-streamed call at "json".
            for item in self._kv_pull_items(body):
                yield item
            yield ("json", result.model_dump(mode="json", exclude_none=False))
        else:
            # The pull's report goes ahead of the first token when it is known by then (it is
            # for a failure or a gRPC pull), so the router can label the response in its headers.
            if not self._pulls_kv(body):
                yield ("head", {})
            reported = first = None
            async for chunk in result:
                if first is None:
                    first = self._kv_pull_items(body)
                    reported = bool(first)
                    for item in first:
                        yield item
                yield ("sse", chunk)
            if not reported:
                for item in self._kv_pull_items(body):
                    yield item

    def _pulls_kv(self, body: dict[str, Any]) -> bool:
        """Whether this call is a P/D decode leg, which pulls its prompt's KV from a prefill engine."""
        return self.role == "decode" and isinstance(body.get("kv_transfer_params"), dict)

    def _kv_pull_items(self, body: dict[str, Any]) -> list[Item]:
        """A ("kv", {...}) item with this decode engine's pull of the request's KV, where known."""
        params = body.get("kv_transfer_params") if self.role == "decode" else None
        pull = self.tracker.transfer_of(params.get("remote_request_id")) if isinstance(params, dict) else None
        return [("kv", pull)] if pull else []

    def load(self) -> dict[str, Any]:
        report = self.tracker.snapshot().to_dict()
        report.update(role=self.role, index=self.index, cores=self.cores, kv_port=self.kv_port, pid=os.getpid())
        if self.kv_events_source is not None:
            report["kv_events"] = self.kv_events_source
        faults = self._faults.current().active()  # one stat() per load poll
        if faults:
            report["faults"] = faults
        return report

    def set_kv_faults(self, spec: dict[str, Any] | None) -> dict[str, Any]:
        """Sets (or with None clears) the faults injected into this engine's KV transfers."""
        if self.fault_file is None:
            raise ValueError("a monolithic engine has no KV link")
        parsed = write_faults(self.fault_file, spec)
        return {"role": self.role, "index": self.index, "faults": parsed.__dict__}

    def kv_faults(self) -> dict[str, Any]:
        current = self._faults.current() if self.fault_file else None
        return {"role": self.role, "index": self.index, "faults": current.__dict__ if current else None}

    async def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("engine not started")
        await self.engine.check_health()


def advertised_address() -> str:
    """The address this replica advertises to other hosts (direct token stream, NIXL side
    channel, gRPC KV endpoint): Ray's IP for the node it runs on.

    Raises, so the replica fails at startup with a message instead of handing other hosts an
    address that leads nowhere, when Ray has no node IP for it, or when that IP is loopback
    while the Ray cluster has more than one node (peers on other hosts would dial
    themselves). A single-node cluster on loopback is fine: every peer is on that node."""
    import ray

    node = socket.gethostname()
    fix = "start Ray on that host with --node-ip-address <an address the other hosts reach it at>"
    try:
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialized in this process")
        ip = ray.util.get_node_ip_address()
        if not ip:
            raise RuntimeError("Ray gives no node IP")
    except Exception as e:  # noqa: BLE001 - any failure means the same: no address to advertise
        raise RuntimeError(f"replica on node {node} has no routable address ({e}); {fix}") from e
    if _is_loopback(ip):
        try:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"replica on node {node} has the loopback address {ip} and the Ray cluster's "
                               f"nodes cannot be counted ({e!r}); {fix}") from e
        if alive > 1:
            raise RuntimeError(f"replica on node {node} has no routable address: Ray's node IP is the loopback "
                               f"address {ip} while the Ray cluster has {alive} nodes; {fix}")
    return ip


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
