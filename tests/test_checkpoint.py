"""Parameter counts and weight bytes read from safetensors headers, without loading weights."""

import json
import struct

import pytest
import torch
import transformers

from kvforge.errors import ConfigError
from kvforge.models.checkpoint import read_safetensors_header, resolve_model, scan_checkpoint
from kvforge.planner import plan_kv, resolve_weights

TINY = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 512,
}


def save_tiny(path, dtype=torch.float16, tie=False, max_shard_size=None):
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_scan_counts_what_transformers_saved(tmp_path, tie):
    model = save_tiny(tmp_path, tie=tie)
    info = scan_checkpoint(tmp_path)
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert info.num_params == params
    assert info.num_bytes == params * 2
    assert info.dtype == "fp16"
    assert len(info.files) == 1


def test_sharded_checkpoint(tmp_path):
    model = save_tiny(tmp_path, dtype=torch.float32, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    info = scan_checkpoint(tmp_path)
    assert len(info.files) > 1
    assert info.num_params == sum(p.numel() for p in model.parameters())
    assert info.num_bytes == info.num_params * 4
    assert info.dtype == "fp32"


def test_resolve_checkpoint_directory_and_plan_with_its_bytes(tmp_path):
    model = save_tiny(tmp_path)
    source = resolve_model(str(tmp_path))
    assert source.kind == "checkpoint"
    assert source.spec.num_kv_heads == 2 and source.spec.head_dim == 16
    weights = resolve_weights(
        source.spec,
        num_params=source.checkpoint.num_params,
        checkpoint_bytes=source.checkpoint.num_bytes,
    )
    params = sum(p.numel() for p in model.parameters())
    assert weights.num_bytes == params * 2
    plan = plan_kv(source.spec, context=100, memory_bytes=10**7, weights=weights)
    assert plan.kv_bytes_total == 10**7 - params * 2
    # a different weights dtype overrides the checkpoint's bytes
    as_fp32 = resolve_weights(source.spec, weights_dtype="fp32", num_params=params)
    assert as_fp32.num_bytes == params * 4


def test_resolve_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", **TINY}))
    source = resolve_model(str(path))
    assert (source.kind, source.spec.num_layers, source.checkpoint) == ("config", 2, None)


def test_directory_without_weights_has_no_checkpoint_info(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    assert resolve_model(str(tmp_path)).checkpoint is None


def test_resolve_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"a checkpoint directory needs a config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ConfigError, match="no such GGUF file, config file or checkpoint directory"):
        resolve_model(str(tmp_path / "nope" / "config.json"))
    with pytest.raises(
        ConfigError, match=r"unknown model .gpt-9.: not a GGUF file.*presets: llama-2-7b"
    ):
        resolve_model("gpt-9")


def write_raw(path, header: bytes, length: int | None = None):
    length = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", length) + header)


def test_corrupt_safetensors_are_clear_errors(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(ConfigError, match="too short to be a safetensors file"):
        read_safetensors_header(short)
    huge = tmp_path / "huge.safetensors"
    write_raw(huge, b"{}", length=2**40)
    with pytest.raises(ConfigError, match="is not a safetensors header"):
        read_safetensors_header(huge)
    garbage = tmp_path / "garbage.safetensors"
    write_raw(garbage, b"{not json")
    with pytest.raises(ConfigError, match="header is not valid JSON"):
        read_safetensors_header(garbage)
    entry = tmp_path / "entry.safetensors"
    write_raw(
        entry, json.dumps({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}).encode()
    )
    with pytest.raises(ConfigError, match="malformed header entry for tensor 'w'"):
        read_safetensors_header(entry)
    sizes = tmp_path / "sizes.safetensors"
    write_raw(
        sizes, json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    )
    with pytest.raises(ConfigError, match=r"tensor 'w' has 4 bytes for shape \(2,\)"):
        read_safetensors_header(sizes)


def test_index_with_missing_shard(tmp_path):
    save_tiny(tmp_path, dtype=torch.float32, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ConfigError, match="shards listed in the index are missing"):
        scan_checkpoint(tmp_path)
