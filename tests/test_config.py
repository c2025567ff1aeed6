import json

import pytest

from kvforge.config import ModelSpec, load_hf_config, spec_from_hf_config
from kvforge.dtypes import normalize_dtype
from kvforge.errors import ConfigError

BASE = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "hidden_size": 256,
    "max_position_embeddings": 2048,
}


def spec(**overrides) -> ModelSpec:
    return spec_from_hf_config({**BASE, **overrides}, name="test")


def test_absent_kv_heads_means_mha_and_head_dim_is_hidden_over_heads():
    s = spec()
    assert (s.num_kv_heads, s.head_dim, s.attention_kind) == (8, 32, "MHA")
    assert s.gqa_saving_factor == 1


def test_gqa_mqa_and_explicit_head_dim():
    assert spec(num_key_value_heads=2).attention_kind == "GQA"
    assert spec(num_key_value_heads=2).gqa_saving_factor == 4
    assert spec(num_key_value_heads=1).attention_kind == "MQA"
    assert spec(head_dim=64).head_dim == 64  # head_dim wins over hidden_size / heads


def test_multi_query_flag_without_kv_heads():
    assert spec(multi_query=True).num_kv_heads == 1


def test_dtype_from_torch_dtype_or_dtype():
    assert spec(torch_dtype="bfloat16").dtype == "bf16"
    assert spec(dtype="float32").dtype == "fp32"
    assert spec().dtype == "fp16"


def test_sliding_window_rules():
    assert spec(sliding_window=4096).sliding_window == 4096
    assert spec(sliding_window=4096, use_sliding_window=False).sliding_window is None
    hybrid = ["sliding_attention", "full_attention"] * 2
    assert spec(sliding_window=512, layer_types=hybrid).sliding_window is None
    all_sliding = ["sliding_attention"] * 4
    assert spec(sliding_window=512, layer_types=all_sliding).sliding_window == 512
    assert spec(sliding_window=None).sliding_window is None


def test_gpt2_field_names():
    s = spec_from_hf_config(
        {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024},
        name="gpt2",
    )
    assert (s.num_layers, s.num_attention_heads, s.head_dim, s.max_position_embeddings) == (
        12,
        12,
        64,
        1024,
    )


def test_text_config_of_multimodal_models():
    s = spec_from_hf_config({"model_type": "llava", "text_config": {**BASE}}, name="mm")
    assert s.num_layers == 4


def test_normalize_dtype():
    assert normalize_dtype("torch.bfloat16") == "bf16"
    assert normalize_dtype("F16") == "fp16"
    with pytest.raises(ConfigError, match="unknown dtype 'float64'"):
        normalize_dtype("float64")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_hidden_layers": None}, "missing required field 'num_hidden_layers'"),
        ({"num_attention_heads": "8"}, "num_attention_heads must be a positive integer, got '8'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be a positive integer, got True"),
        ({"max_position_embeddings": -1}, "max_position_embeddings must be a positive integer"),
        ({"num_key_value_heads": 3}, r"num_attention_heads \(8\) must be a multiple of"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
        ({"hidden_size": 250}, r"hidden_size \(250\) is not divisible by num_attention_heads"),
        ({"head_dim": 0}, "head_dim must be a positive integer, got 0"),
        ({"sliding_window": -5}, "sliding_window must be a positive integer or absent"),
        ({"torch_dtype": "float64"}, "unknown dtype 'float64'"),
    ],
)
def test_bad_configs_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        spec(**overrides)


def test_missing_hidden_size_without_head_dim():
    config = {k: v for k, v in BASE.items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match="missing required field 'hidden_size'"):
        spec_from_hf_config(config, name="x")


def test_config_must_be_an_object():
    with pytest.raises(ConfigError, match="a config must be a JSON object, got list"):
        spec_from_hf_config([1, 2], name="x")


def test_load_hf_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_hf_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"num_hidden_layers": 4,')
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON \(.* at line 1 column"):
        load_hf_config(bad)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([BASE]))
    with pytest.raises(ConfigError, match="a config must be a JSON object, got list"):
        load_hf_config(listed)
