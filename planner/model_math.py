"""Memory arithmetic for a model from its Hugging Face config.json.

KV bytes per token = 2 (K and V) × n_layers × n_kv_heads × head_dim × bytes_per_element
(the playbook's formula; Llama-3-70B in BF16: 327,680 B). Parameter counts assume a
Llama-like decoder: gated MLP (gate, up, down), untied LM head unless the config ties it,
biases ignored. Mixture-of-experts configs (Mixtral, Qwen-MoE, DeepSeek) and DeepSeek's
multi-head latent attention (MLA, which caches one compressed latent per layer) are recognised.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

GIB = 1 << 30

DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "fp32": 4, "float": 4,
    "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "float8": 1, "fp8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1,
    "int4": 0.5, "fp4": 0.5, "nvfp4": 0.5, "mxfp4": 0.5,
}

# Shapes as their published config.json files give them (only the fields used here).
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
    "llama-3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192),
    "llama-3.1-405b": dict(_LLAMA3, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8, max_position_embeddings=131072),
    "mixtral-8x7b": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
                     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                     "max_position_embeddings": 32768},
    "deepseek-v3": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "q_lora_rank": 1536,
                    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                    "quantization_config": {"quant_method": "fp8"}, "max_position_embeddings": 163840},
}
ALIASES = {"llama-3.1-8b": "llama-3-8b", "llama-3.1-70b": "llama-3-70b", "llama-3-405b": "llama-3.1-405b"}


def _builtin_presets() -> dict[str, dict[str, Any]]:
    from pdserve.engine.tiny_model import BUILTIN_MODELS

    return dict(BUILTIN_MODELS)


def preset_names() -> list[str]:
    return sorted([*PRESETS, *ALIASES, *_builtin_presets()])


def load_model_config(spec: str) -> tuple[str, dict[str, Any]]:
    """A preset name, a config.json path, or a model directory holding config.json -> (name, config)."""
    key = spec.strip().lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return key, dict(PRESETS[key])
    builtin = _builtin_presets()
    if key in builtin:
        return key, dict(builtin[key])
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--model-config {spec!r} is neither a preset ({', '.join(preset_names())}) "
                         f"nor a config.json file or model directory")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return path.parent.name or str(path), cfg


def dtype_bytes(name: str) -> float:
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


def _get(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _count(cfg: Mapping[str, Any], name: str, *keys: str, default: Optional[int] = None) -> int:
    v = _get(cfg, *keys, default=default)
    if v is None:
        raise ValueError(f"model config lacks {name} (any of: {', '.join(keys)})")
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"model config: {keys[0]} must be a non-negative integer, got {v!r}")
    return v


def _weight_bytes_per_param(cfg: Mapping[str, Any], dtype: str) -> float:
    q = cfg.get("quantization_config") or {}
    if isinstance(q, dict):
        if isinstance(q.get("bits"), (int, float)) and not isinstance(q.get("bits"), bool):
            return q["bits"] / 8
        method = str(q.get("quant_method", "")).lower()
        if method in DTYPE_BYTES:
            return DTYPE_BYTES[method]
    return dtype_bytes(dtype)


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    dtype: str
    weight_bytes_per_param: float
    kv_bytes_per_element: float
    n_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    dense_layers: int = 0  # leading layers with a dense MLP in an MoE model (DeepSeek)
    # MLA (DeepSeek): the KV cache holds one latent of kv_lora_rank + qk_rope_head_dim per layer.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def kv_bytes_per_token(self) -> int:
        if self.is_mla:
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.n_kv_heads * self.head_dim
        return int(round(self.n_layers * per_layer * self.kv_bytes_per_element))

    def kv_bytes(self, tokens: int) -> int:
        return self.kv_bytes_per_token * tokens

    def _attention_params(self) -> int:
        h = self.hidden_size
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.n_heads * qk) if self.q_lora_rank \
                else h * self.n_heads * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) \
                + self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + self.n_heads * self.v_head_dim * h
        q_out = self.n_heads * self.head_dim
        return h * q_out + 2 * h * self.n_kv_heads * self.head_dim + q_out * h

    def param_counts(self) -> "ParamCounts":
        h = self.hidden_size
        embed = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        norms = self.n_layers * 2 * h + h
        attention = self.n_layers * self._attention_params()
        dense_mlp_layers = self.dense_layers if self.is_moe else self.n_layers
        dense_mlp = dense_mlp_layers * 3 * h * self.intermediate_size
        moe_layers = self.n_layers - dense_mlp_layers
        one_expert = 3 * h * self.expert_intermediate_size
        shared = 3 * h * self.shared_expert_intermediate_size
        router = h * self.n_experts
        experts = moe_layers * self.n_experts * one_expert
        other_moe = moe_layers * (shared + router)
        total = embed + norms + attention + dense_mlp + experts + other_moe
        active = total - experts + moe_layers * self.experts_per_token * one_expert
        return ParamCounts(total=total, active=active, experts=experts, non_expert=total - experts)

    def weight_bytes(self) -> int:
        return int(self.param_counts().total * self.weight_bytes_per_param)

    def active_weight_bytes(self) -> int:
        return int(self.param_counts().active * self.weight_bytes_per_param)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int      # parameters one token passes through (= total for a dense model)
    experts: int     # routed-expert parameters (0 for a dense model)
    non_expert: int  # attention, dense/shared MLPs, embeddings, norms


def shape_from_config(cfg: Mapping[str, Any], name: str = "model", dtype: Optional[str] = None,
                      kv_dtype: Optional[str] = None) -> ModelShape:
    """Read a Hugging Face config.json dict. ``dtype`` overrides the weights' dtype (and the KV
    cache's, unless ``kv_dtype`` is given, as vLLM's kv_cache_dtype would)."""
    if not isinstance(cfg, Mapping):
        raise ValueError("model config must be a JSON object")
    if isinstance(cfg.get("text_config"), Mapping):  # multimodal wrappers keep the LM here
        cfg = {**cfg, **cfg["text_config"]}
    n_layers = _count(cfg, "the layer count", "num_hidden_layers", "n_layer", "num_layers")
    hidden = _count(cfg, "the hidden size", "hidden_size", "n_embd", "d_model")
    n_heads = _count(cfg, "the attention head count", "num_attention_heads", "n_head", "num_heads")
    if n_layers == 0 or hidden == 0 or n_heads == 0:
        raise ValueError("model config: num_hidden_layers, hidden_size and num_attention_heads must be > 0")
    n_kv = _count(cfg, "the KV head count", "num_key_value_heads", "num_kv_heads", default=n_heads)
    head_dim = _get(cfg, "head_dim")
    if head_dim is None:
        if hidden % n_heads:
            raise ValueError(f"model config: hidden_size {hidden} is not a multiple of num_attention_heads "
                             f"{n_heads}; give head_dim")
        head_dim = hidden // n_heads
    intermediate = _count(cfg, "the MLP size", "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    vocab = _count(cfg, "the vocabulary size", "vocab_size")
    model_dtype = str(dtype or _get(cfg, "torch_dtype", "dtype", default="bfloat16"))
    wbytes = dtype_bytes(dtype) if dtype else _weight_bytes_per_param(cfg, model_dtype)
    kv_bytes = dtype_bytes(kv_dtype) if kv_dtype else dtype_bytes(model_dtype)

    n_experts = _count(cfg, "the expert count", "num_local_experts", "n_routed_experts", "num_experts", default=0)
    expert_inter = shared_inter = dense_layers = topk = 0
    if n_experts:
        topk = _count(cfg, "experts per token", "num_experts_per_tok", "moe_topk", "top_k", default=2)
        expert_inter = _count(cfg, "the expert MLP size", "moe_intermediate_size", default=intermediate)
        shared_inter = _count(cfg, "the shared expert size", "shared_expert_intermediate_size", default=0) \
            or _count(cfg, "shared experts", "n_shared_experts", default=0) * expert_inter
        dense_layers = min(_count(cfg, "dense layers", "first_k_dense_replace", default=0), n_layers)
    return ModelShape(
        name=name, n_layers=n_layers, hidden_size=hidden, n_heads=n_heads, n_kv_heads=n_kv, head_dim=int(head_dim),
        intermediate_size=intermediate, vocab_size=vocab,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), dtype=model_dtype,
        weight_bytes_per_param=wbytes, kv_bytes_per_element=kv_bytes,
        n_experts=n_experts, experts_per_token=topk, expert_intermediate_size=expert_inter,
        shared_expert_intermediate_size=shared_inter, dense_layers=dense_layers,
        kv_lora_rank=_count(cfg, "kv_lora_rank", "kv_lora_rank", default=0),
        q_lora_rank=_count(cfg, "q_lora_rank", "q_lora_rank", default=0),
        qk_nope_head_dim=_count(cfg, "qk_nope_head_dim", "qk_nope_head_dim", default=0),
        qk_rope_head_dim=_count(cfg, "qk_rope_head_dim", "qk_rope_head_dim", default=0),
        v_head_dim=_count(cfg, "v_head_dim", "v_head_dim", default=int(head_dim)),
    )


def load_shape(spec: str, dtype: Optional[str] = None, kv_dtype: Optional[str] = None) -> ModelShape:
    name, cfg = load_model_config(spec)
    return shape_from_config(cfg, name=name, dtype=dtype, kv_dtype=kv_dtype)


@dataclass(frozen=True)
class KVTransfer:
    tokens: int
    bytes: int
    gib: float
    seconds: float


def kv_transfer(shape: ModelShape, context_tokens: int, link_gbps: float) -> KVTransfer:
    """One request's prompt KV moved prefill -> decode over a link of ``link_gbps`` GB/s (10^9 B/s)."""
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 0:
        raise ValueError(f"context tokens must be an integer >= 0, got {context_tokens!r}")
    if not (isinstance(link_gbps, (int, float)) and math.isfinite(link_gbps) and link_gbps > 0):
        raise ValueError(f"link bandwidth must be > 0 GB/s, got {link_gbps!r}")
    b = shape.kv_bytes(context_tokens)
    return KVTransfer(tokens=context_tokens, bytes=b, gib=b / GIB, seconds=b / (link_gbps * 1e9))
