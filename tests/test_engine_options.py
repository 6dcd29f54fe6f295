"""vLLM's engine and serving options reachable from config: engine_kwargs passed through to
AsyncEngineArgs, chat template / tool-call parser / reasoning parser to vLLM's serving layer."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pdserve.engine.server import EngineServer, serving_args
from pdserve.engine.tiny_model import resolve_model
from pdserve.router.protocol import RequestChecker
from pdserve.settings.cluster import ClusterConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _with_engine(**engine) -> ClusterConfig:
    raw = load_config(CONFIGS / "cpu-monolithic.yaml").model_dump()
    raw["engine"].update(engine)
    return ClusterConfig.model_validate(raw)


def test_engine_kwargs_reach_vllms_engine_args():
    cfg = _with_engine(engine_kwargs={"max_logprobs": 7, "logprobs_mode": "raw_logits"})
    args = EngineServer(cfg, "monolithic", 0)._engine_args()
    assert args.max_logprobs == 7 and args.logprobs_mode == "raw_logits"
    assert args.max_model_len == cfg.model.max_model_len  # pdserve's own keys still apply


@pytest.mark.parametrize("kwargs, says", [
    ({"max_logprob": 7}, "engine_kwargs.max_logprob: not an argument of vLLM's engine"),
    ({"max_model_len": 512}, "engine_kwargs.max_model_len: set by pdserve from model.max_model_len"),
])
def test_unknown_or_owned_engine_kwargs_fail_when_the_config_loads(kwargs, says):
    with pytest.raises(ValidationError, match=says):
        _with_engine(engine_kwargs=kwargs)


def test_serving_options_become_vllms_serving_command_line():
    plain = serving_args(_with_engine(), "/m")
    assert plain == ["--model", "/m", "--served-model-name", "tiny", "--enable-prompt-tokens-details"]
    args = serving_args(_with_engine(chat_template="{{ 'x' }}", tool_call_parser="hermes",
                                     reasoning_parser="deepseek_r1"), "/m")
    assert args[len(plain):] == ["--chat-template", "{{ 'x' }}", "--enable-auto-tool-choice",
                                 "--tool-call-parser", "hermes", "--reasoning-parser", "deepseek_r1"]
    # vLLM's own parser takes them (an unknown flag here would be a startup failure)
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(args)
    assert parsed.tool_call_parser == "hermes" and parsed.enable_auto_tool_choice
    assert parsed.reasoning_parser == "deepseek_r1" and parsed.chat_template == "{{ 'x' }}"


def test_the_router_counts_prompts_with_the_configured_template(tmp_path):
    path = resolve_model("builtin:tiny")
    msgs = [{"role": "user", "content": "hi"}]
    default = RequestChecker("tiny", path, 256).check("chat", {"messages": msgs}).prompt_tokens
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}" + "padding " * 20 + "{{ m['content'] }}{% endfor %}")
    custom = RequestChecker("tiny", path, 256, chat_template=str(template)).check("chat", {"messages": msgs})
    assert custom.prompt_tokens > default
