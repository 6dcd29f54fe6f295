"""The built-in tiny Llama: a model directory made here, with nothing downloaded.

vLLM loads it with ``load_format="dummy"``; the dummy weights are seeded, so every
engine that loads this directory holds identical weights and greedy outputs can be
compared token for token across prefill/decode and monolithic serving.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
TINY_NAME = "tiny"
TINY_VERSION = "1"

# head_dim must be 64: vLLM's CPU attention rejects 16. 2 layers x 2 KV heads x 64 x
# (K, V) x 2 bytes = 1 KiB of KV per token in bfloat16.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 2048,  # the BPE target; config.json gets the trained size
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}

# Same tokenizer and compute class, but 32 KiB of KV per token (8 layers x 16 KV heads x 64 x
# 2 x 2 bytes): a 2,048-token prompt moves 64 MiB, enough to measure transfer bandwidth.
WIDE_NAME = "tiny-wide"
BUILTIN_MODELS = {
    TINY_NAME: TINY_CONFIG,
    WIDE_NAME: dict(TINY_CONFIG, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=16),
}

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# Unknown roles raise inside the template, so vLLM answers them with a 400.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'developer', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role: ' ~ m['role']) }}"
    "{% endif %}"
    "{% set role = 'system' if m['role'] == 'developer' else m['role'] %}"
    "<|{{ role }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the a an of to in and for with on at by from about into over after before under between "
    "serve model token prefill decode cache block transfer engine router replica request "
    "latency throughput goodput stream queue budget tenant priority cluster fallback link "
    "time first output input prompt answer question chat user assistant system hello world "
    "please explain why how what when where which who data memory compute network fast slow "
    "one two three four five six seven eight nine ten hundred thousand million number value "
    "is are was were be been has have had do does did can could will would should may might "
    "good bad new old small large long short high low open close start stop run walk read write"
).split()


def _corpus(lines: int = 4000) -> list[str]:
    """Deterministic pseudo-English text to train the BPE merges on."""
    out = []
    state = 12345
    for i in range(lines):
        n = 6 + (i % 11)
        words = []
        for _ in range(n):
            state = (state * 1103515245 + 12345) & 0x7FFFFFFF
            words.append(_WORDS[state % len(_WORDS)])
        sentence = " ".join(words).capitalize()
        out.append(sentence + (". " if i % 3 else "? ") + str(i % 97))
    return out


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def write_tiny_model(out_dir: str | os.PathLike, name: str = TINY_NAME) -> Path:
    """Write config.json, tokenizer files and the chat template of built-in ``name`` into ``out_dir``."""
    model_config = BUILTIN_MODELS[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(model_config["vocab_size"])
    tok.save(str(out / "tokenizer.json"))
    # The model's vocabulary must match the tokenizer's, or greedy decoding of random
    # weights picks ids the tokenizer cannot decode.
    config = dict(model_config, vocab_size=tok.get_vocab_size())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}, indent=2)
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|bos|>",
                "eos_token": "<|eos|>",
                "pad_token": "<|pad|>",
                "unk_token": None,
                "add_bos_token": False,
                "model_max_length": model_config["max_position_embeddings"],
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}, indent=2)
    )
    (out / "PDSERVE_TINY").write_text(TINY_VERSION + "\n")
    return out


def cache_dir() -> Path:
    base = os.environ.get("PDSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve")
    return Path(base)


def _builtin_dir(name: str) -> Path:
    config = json.dumps(BUILTIN_MODELS[name], sort_keys=True)
    digest = hashlib.sha256((config + CHAT_TEMPLATE + TINY_VERSION).encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{name}-{digest}"


def resolve_model(model: str) -> str:
    """Turn ``builtin:tiny`` into a directory (built once, atomically); pass others through."""
    if not model.startswith(BUILTIN_PREFIX):
        return model
    name = model[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise ValueError(f"unknown built-in model {model!r}; the built-in models are: {known}")
    target = _builtin_dir(name)
    if (target / "PDSERVE_TINY").exists():
        return str(target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    write_tiny_model(tmp, name)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished first; its copy is identical.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
