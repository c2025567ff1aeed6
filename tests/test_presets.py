"""Presets: published parameter counts, and transformers' own count of the same configs."""

import pytest
import torch
import transformers

from kvforge.errors import ConfigError
from kvforge.presets import PRESETS, find_preset, get_preset

# Parameter counts published with the checkpoints (model cards / safetensors totals).
PUBLISHED_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMS)
def test_parameter_count_matches_published(name):
    assert get_preset(name).parameter_count() == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_transformers(name):
    """Build the preset's config in transformers on the meta device and count its parameters."""
    config = dict(PRESETS[name][1])
    model_type = config.pop("model_type")
    config.pop("torch_dtype", None)
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert get_preset(name).parameter_count() == sum(p.numel() for p in model.parameters())


def test_preset_lookup_by_hf_id_and_case():
    assert find_preset("meta-llama/Llama-2-7b-hf").name == "llama-2-7b"
    assert find_preset("LLAMA-3-70B").name == "llama-3-70b"
    assert find_preset("no-such-model") is None


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'llama-9'; presets: llama-2-7b, "):
        get_preset("llama-9")


def test_published_shapes():
    l3 = get_preset("llama-3-70b")
    assert (l3.num_layers, l3.num_kv_heads, l3.head_dim, l3.dtype) == (80, 8, 128, "bf16")
    assert get_preset("llama-2-70b").gqa_saving_factor == 8  # 8 query heads per KV head
    assert get_preset("llama-3.1-405b").gqa_saving_factor == 16  # 128 query heads, 8 KV heads
    assert get_preset("mistral-7b").sliding_window == 4096
    assert get_preset("qwen2.5-7b").sliding_window is None  # use_sliding_window: false
    gpt3 = get_preset("gpt-3-175b")
    assert (gpt3.num_layers, gpt3.num_kv_heads, gpt3.head_dim, gpt3.attention_kind) == (
        96,
        96,
        128,
        "MHA",
    )
