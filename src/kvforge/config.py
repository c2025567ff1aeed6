"""Typed model descriptions, read from presets or Hugging Face `config.json` files.

`ModelSpec` holds what the KV math and the parameter count need. It is frozen
and validated on construction, so every later stage can trust its numbers.
`spec_from_hf_config` maps the many spellings found in HF configs onto it.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvforge.dtypes import DTYPE_BITS, normalize_dtype
from kvforge.errors import ConfigError, positive_int

# Families whose parameter count follows from the config alone (see `parameter_count`).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GPT_FAMILY = ("gpt2", "gpt3")


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, as far as memory is concerned.

    `num_kv_heads` < `num_attention_heads` is GQA, == 1 is MQA. `sliding_window`
    (tokens) bounds what each layer attends to, and so what the cache must keep.
    `dtype` is the checkpoint's precision, the default for weights and KV.
    """

    name: str
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_position_embeddings: int
    dtype: str = "bf16"
    sliding_window: int | None = None
    vocab_size: int | None = None
    intermediate_size: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q, k, v projections (Qwen2; Llama attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3)

    def __post_init__(self) -> None:
        for field in (
            "num_layers",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "hidden_size",
            "max_position_embeddings",
        ):
            positive_int(f"{self.name}: {field}", getattr(self, field), ConfigError)
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.name}: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window <= 0
        ):
            raise ConfigError(
                f"{self.name}: sliding_window must be a positive integer or absent, "
                f"got {self.sliding_window!r}"
            )
        if self.dtype not in DTYPE_BITS:
            raise ConfigError(f"{self.name}: unknown dtype {self.dtype!r}")

    @property
    def attention_kind(self) -> str:
        if self.num_kv_heads == self.num_attention_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def gqa_saving_factor(self) -> float:
        """How many times smaller the cache is than with one KV head per query head."""
        return self.num_attention_heads / self.num_kv_heads

    def parameter_count(self) -> int | None:
        """Exact parameter count from the shape, or None for families we cannot count.

        Llama family: embeddings (+ untied lm_head), per layer q/k/v/o projections
        with optional biases, optional q/k RMSNorm, a gated MLP (gate, up, down)
        and two RMSNorms, then a final norm. GPT-2/3: token and learned position
        embeddings (tied head), per layer fused qkv + proj with biases, a 4x MLP
        with biases and two LayerNorms (weight + bias), then a final LayerNorm.
        The tests check both against transformers' own models.
        """
        h, q_dim = self.hidden_size, self.num_attention_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        if self.vocab_size is None or (
            self.architecture in LLAMA_FAMILY and self.intermediate_size is None
        ):
            return None
        if self.architecture in LLAMA_FAMILY:
            inter = self.intermediate_size
            attention = h * q_dim + 2 * h * kv_dim + q_dim * h
            if self.qkv_bias:
                attention += q_dim + 2 * kv_dim
            if self.o_bias:
                attention += h
            if self.qk_norm:
                attention += 2 * self.head_dim
            mlp = 3 * h * inter + ((2 * inter + h) if self.mlp_bias else 0)
            layer = attention + mlp + 2 * h
            embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
            return embeddings + self.num_layers * layer + h
        if self.architecture in GPT_FAMILY:
            layer = 12 * h * h + 13 * h
            embeddings = self.vocab_size * h + self.max_position_embeddings * h
            return embeddings + self.num_layers * layer + 2 * h
        return None


# Keys that different HF configs use for the same quantity, first match wins.
_KEY_ALIASES = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_seq_len"),
    "intermediate_size": ("intermediate_size", "n_inner"),
}


def _lookup(config: dict[str, Any], key: str) -> Any:
    for alias in _KEY_ALIASES.get(key, (key,)):
        if config.get(alias) is not None:
            return config[alias]
    return None


def _require_int(config: dict[str, Any], key: str, source: str) -> int:
    value = _lookup(config, key)
    if value is None:
        raise ConfigError(f"{source}: missing required field {key!r}")
    return positive_int(f"{source}: {key}", value, ConfigError)


def spec_from_hf_config(config: Any, name: str, source: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a parsed HF config dict.

    Reads num_hidden_layers, num_attention_heads, num_key_value_heads (absent:
    MHA), head_dim (absent: hidden_size / heads), sliding_window (ignored when
    use_sliding_window is false, or when some layers attend to everything),
    max_position_embeddings and torch_dtype (or `dtype`, its newer name; absent:
    fp16). Multimodal configs are read from `text_config`.
    """
    source = source or name
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: a config must be a JSON object, got {type(config).__name__}")
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "name_or_path": config.get("_name_or_path")}

    num_layers = _require_int(config, "num_hidden_layers", source)
    num_heads = _require_int(config, "num_attention_heads", source)
    num_kv_heads = config.get("num_key_value_heads")
    if num_kv_heads is None:
        num_kv_heads = 1 if config.get("multi_query") else num_heads
    else:
        positive_int(f"{source}: num_key_value_heads", num_kv_heads, ConfigError)

    hidden_size = _lookup(config, "hidden_size")
    head_dim = config.get("head_dim")
    if head_dim is None:
        hidden_size = _require_int(config, "hidden_size", source)
        if hidden_size % num_heads:
            raise ConfigError(
                f"{source}: hidden_size ({hidden_size}) is not divisible by "
                f"num_attention_heads ({num_heads}) and there is no head_dim"
            )
        head_dim = hidden_size // num_heads
    else:
        positive_int(f"{source}: head_dim", head_dim, ConfigError)
    if hidden_size is None:
        hidden_size = num_heads * head_dim

    max_positions = _require_int(config, "max_position_embeddings", source)
    sliding_window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if config.get("use_sliding_window") is False or (
        # Hybrid models (some layers full, some sliding) keep the full context in
        # their full layers, so the window does not cap the cache: plan for all of it.
        isinstance(layer_types, list) and any(t != "sliding_attention" for t in layer_types)
    ):
        sliding_window = None

    raw_dtype = config.get("torch_dtype") or config.get("dtype") or "fp16"
    model_type = str(config.get("model_type") or "unknown").lower()
    intermediate = _lookup(config, "intermediate_size")
    if intermediate is None and model_type in GPT_FAMILY:
        intermediate = 4 * hidden_size
    qkv_bias = bool(config.get("attention_bias", model_type == "qwen2"))
    return ModelSpec(
        name=name,
        architecture=model_type,
        num_layers=num_layers,
        num_attention_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_size=hidden_size,
        max_position_embeddings=max_positions,
        dtype=normalize_dtype(raw_dtype),
        sliding_window=sliding_window,
        vocab_size=config.get("vocab_size"),
        intermediate_size=intermediate,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type in GPT_FAMILY)),
        qkv_bias=qkv_bias,
        o_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
    )


def load_hf_config(path: Path) -> dict[str, Any]:
    """Read a config.json, with errors that say which file and what is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a JSON object, got {type(config).__name__}")
    return config
