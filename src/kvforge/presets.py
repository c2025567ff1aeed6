"""Well-known models, described by the fields of their published `config.json`.

Each preset is the subset of the HF config that the planner reads, so presets
and user configs go through the same parser (`spec_from_hf_config`), and the
tests can build the very same configs in transformers to check parameter counts.
GPT-3 175B has no HF checkpoint; its entry uses the GPT-2 layout at the sizes of
the GPT-3 paper (96 layers, d_model 12288, 96 heads of 128, 2048 context).
"""

from kvforge.config import ModelSpec, spec_from_hf_config
from kvforge.errors import ConfigError

_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096}
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "torch_dtype": "bfloat16"}

# name -> (Hugging Face repository id, config fields)
PRESETS: dict[str, tuple[str, dict]] = {
    "llama-2-7b": (
        "meta-llama/Llama-2-7b-hf",
        {**_LLAMA2, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 32, "hidden_size": 4096, "intermediate_size": 11008,
         "torch_dtype": "float16"},
    ),
    "llama-2-13b": (
        "meta-llama/Llama-2-13b-hf",
        {**_LLAMA2, "num_hidden_layers": 40, "num_attention_heads": 40,
         "num_key_value_heads": 40, "hidden_size": 5120, "intermediate_size": 13824,
         "torch_dtype": "float16"},
    ),
    "llama-2-70b": (
        "meta-llama/Llama-2-70b-hf",
        {**_LLAMA2, "num_hidden_layers": 80, "num_attention_heads": 64,
         "num_key_value_heads": 8, "hidden_size": 8192, "intermediate_size": 28672,
         "torch_dtype": "float16"},
    ),
    "llama-3-8b": (
        "meta-llama/Meta-Llama-3-8B",
        {**_LLAMA3, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "hidden_size": 4096, "intermediate_size": 14336,
         "max_position_embeddings": 8192},
    ),
    "llama-3-70b": (
        "meta-llama/Meta-Llama-3-70B",
        {**_LLAMA3, "num_hidden_layers": 80, "num_attention_heads": 64,
         "num_key_value_heads": 8, "hidden_size": 8192, "intermediate_size": 28672,
         "max_position_embeddings": 8192},
    ),
    "llama-3.1-8b": (
        "meta-llama/Llama-3.1-8B",
        {**_LLAMA3, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "hidden_size": 4096, "intermediate_size": 14336,
         "max_position_embeddings": 131072},
    ),
    "llama-3.1-70b": (
        "meta-llama/Llama-3.1-70B",
        {**_LLAMA3, "num_hidden_layers": 80, "num_attention_heads": 64,
         "num_key_value_heads": 8, "hidden_size": 8192, "intermediate_size": 28672,
         "max_position_embeddings": 131072},
    ),
    "llama-3.1-405b": (
        "meta-llama/Llama-3.1-405B",
        {**_LLAMA3, "num_hidden_layers": 126, "num_attention_heads": 128,
         "num_key_value_heads": 8, "hidden_size": 16384, "intermediate_size": 53248,
         "max_position_embeddings": 131072},
    ),
    "llama-3.2-1b": (
        "meta-llama/Llama-3.2-1B",
        {**_LLAMA3, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "hidden_size": 2048, "head_dim": 64,
         "intermediate_size": 8192, "max_position_embeddings": 131072,
         "tie_word_embeddings": True},
    ),
    "llama-3.2-3b": (
        "meta-llama/Llama-3.2-3B",
        {**_LLAMA3, "num_hidden_layers": 28, "num_attention_heads": 24,
         "num_key_value_heads": 8, "hidden_size": 3072, "head_dim": 128,
         "intermediate_size": 8192, "max_position_embeddings": 131072,
         "tie_word_embeddings": True},
    ),
    "smollm2-135m-instruct": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
         "num_key_value_heads": 3, "hidden_size": 576, "intermediate_size": 1536,
         "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
         "torch_dtype": "bfloat16"},
    ),
    "mistral-7b": (
        "mistralai/Mistral-7B-v0.1",
        {"model_type": "mistral", "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "hidden_size": 4096, "intermediate_size": 14336,
         "vocab_size": 32000, "max_position_embeddings": 32768, "sliding_window": 4096,
         "torch_dtype": "bfloat16"},
    ),
    "qwen2.5-7b": (
        "Qwen/Qwen2.5-7B",
        {"model_type": "qwen2", "num_hidden_layers": 28, "num_attention_heads": 28,
         "num_key_value_heads": 4, "hidden_size": 3584, "intermediate_size": 18944,
         "vocab_size": 152064, "max_position_embeddings": 131072,
         "sliding_window": 131072, "use_sliding_window": False,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    ),
    "qwen3-8b": (
        "Qwen/Qwen3-8B",
        {"model_type": "qwen3", "num_hidden_layers": 36, "num_attention_heads": 32,
         "num_key_value_heads": 8, "hidden_size": 4096, "head_dim": 128,
         "intermediate_size": 12288, "vocab_size": 151936, "max_position_embeddings": 40960,
         "tie_word_embeddings": False, "use_sliding_window": False,
         "torch_dtype": "bfloat16"},
    ),
    "gpt-3-175b": (
        "(GPT-3 paper, no public checkpoint)",
        {"model_type": "gpt2", "n_layer": 96, "n_head": 96, "n_embd": 12288,
         "n_positions": 2048, "vocab_size": 50257, "torch_dtype": "float16"},
    ),
}  # fmt: skip


def preset_names() -> list[str]:
    return list(PRESETS)


def find_preset(name: str) -> ModelSpec | None:
    """The preset called `name` (or its HF id), case-insensitively; None if there is none."""
    key = name.strip().lower()
    for preset, (hf_id, config) in PRESETS.items():
        if key in (preset, hf_id.lower()):
            return spec_from_hf_config(config, name=preset, source=f"preset {preset}")
    return None


def get_preset(name: str) -> ModelSpec:
    spec = find_preset(name)
    if spec is None:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return spec
