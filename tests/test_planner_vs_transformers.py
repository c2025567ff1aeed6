"""The planner's bytes per token against the K/V tensors transformers actually keeps.

transformers is the oracle: a random-init model of each family runs a prompt
with its own KV cache, and the bytes of the cached tensors per token must equal
the planner's prediction for the same config and dtype.
"""

import pytest
import torch
import transformers

from kvforge.config import spec_from_hf_config
from kvforge.planner import plan_kv

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

FAMILIES = {
    "llama-mha": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "llama-gqa": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "mistral-mqa": ("mistral", {"num_attention_heads": 4, "num_key_value_heads": 1}),
    "qwen2-gqa": ("qwen2", {"num_attention_heads": 8, "num_key_value_heads": 2}),
    "qwen3-head-dim": (
        "qwen3",
        {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
    ),
}


def cached_bytes(cache) -> int:
    return sum(
        layer.keys.numel() * layer.keys.element_size()
        + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bytes_per_token_equals_transformers_cache(family, dtype):
    model_type, shape = FAMILIES[family]
    fields = {
        "num_hidden_layers": 3,
        "hidden_size": 64,
        "intermediate_size": 96,
        "vocab_size": 101,
        "max_position_embeddings": 256,
        **shape,
    }
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).to(DTYPES[dtype]).eval()
    spec = spec_from_hf_config({"model_type": model_type, **fields}, name=family)
    assert spec.parameter_count() == sum(p.numel() for p in model.parameters())

    prompt_len = 37
    with torch.no_grad():
        out = model(torch.arange(prompt_len)[None] % 101, use_cache=True)
    measured = cached_bytes(out.past_key_values)
    plan = plan_kv(spec, context=prompt_len, kv_dtype=dtype, block_size=1)
    assert measured == prompt_len * plan.bytes_per_token == plan.bytes_per_request
