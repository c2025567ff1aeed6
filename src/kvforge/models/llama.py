"""The Llama-family decoder in plain PyTorch, keeping its K/V in the paged store.

One class covers LlamaForCausalLM (Llama 2, 3, 3.1, 3.2), MistralForCausalLM
(sliding window), Qwen2ForCausalLM (q/k/v bias) and Qwen3ForCausalLM (RMSNorm
on q and k over head_dim): they differ only in flags on `ModelConfig`.
Parameter names are Hugging Face's, so safetensors checkpoints load by name,
and the arithmetic follows transformers step for step (RMSNorm in float32,
RoPE in the rotate_half convention); the tests hold the logits to theirs.

A forward pass takes a flat batch of new tokens from several sequences (no
batch dimension). Each layer writes its new K/V into the `KVStore` and reads
the whole context back through `paged_attention`; no layer keeps any state
between passes.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvforge.attention import AttentionMetadata, paged_attention
from kvforge.config import ModelSpec, spec_from_hf_config
from kvforge.errors import ConfigError
from kvforge.kvcache.store import KVStore
from kvforge.models.layer_ops import rms_norm, rope_and_store, silu_mul
from kvforge.models.linear import ONEDNN, Linear
from kvforge.models.quantized import QuantizedLinear, fuse_quantized
from kvforge.models.rope import (
    DEFAULT_ROPE_THETA,
    Llama3RopeScaling,
    RotaryEmbedding,
    rope_settings,
)

LLAMA_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
DEFAULT_RMS_NORM_EPS = 1e-6  # transformers' LlamaConfig default


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build and run a Llama-family model: the shape (`spec`),
    RoPE and norm constants, and the special token ids.

    Shape flags (vocab size, biases, q/k norm, sliding window...) live on `spec`
    and are exposed here as properties, so there is one source for each number.
    """

    spec: ModelSpec
    architecture: str = "LlamaForCausalLM"  # HF class name; spec.architecture is model_type
    rope_theta: float = DEFAULT_ROPE_THETA
    rope_scaling: Llama3RopeScaling | None = None
    # GGUF's form of a RoPE scaling (Llama 3.1 files): each pair's frequency is divided by
    # its entry. Mutually exclusive with rope_scaling.
    rope_freq_divisors: tuple[float, ...] | None = None
    rms_norm_eps: float = DEFAULT_RMS_NORM_EPS
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        name = self.spec.name
        if self.architecture not in LLAMA_ARCHITECTURES:
            raise ConfigError(
                f"{name}: architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(LLAMA_ARCHITECTURES)}"
            )
        for field in ("vocab_size", "intermediate_size"):
            if getattr(self.spec, field) is None:
                raise ConfigError(f"{name}: missing required field {field!r}")
        if self.spec.mlp_bias:
            raise ConfigError(f"{name}: mlp_bias is not supported")
        divisors = self.rope_freq_divisors
        if divisors is not None and (
            self.rope_scaling is not None or len(divisors) != self.spec.head_dim // 2
        ):
            raise ConfigError(
                f"{name}: rope_freq_divisors needs one entry per channel pair "
                f"({self.spec.head_dim // 2}) and no rope_scaling"
            )
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ConfigError(f"{name}: rope_theta and rms_norm_eps must be positive")

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size  # type: ignore[return-value]  # checked in __post_init__

    @property
    def intermediate_size(self) -> int:
        return self.spec.intermediate_size  # type: ignore[return-value]

    @property
    def tie_word_embeddings(self) -> bool:
        return self.spec.tie_word_embeddings

    @property
    def qkv_bias(self) -> bool:
        return self.spec.qkv_bias

    @property
    def o_bias(self) -> bool:
        return self.spec.o_bias

    @property
    def qk_norm(self) -> bool:
        return self.spec.qk_norm

    @property
    def sliding_window(self) -> int | None:
        return self.spec.sliding_window

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str) -> "ModelConfig":
        """Read a parsed HF config.json; RoPE settings may be in `rope_parameters`
        (transformers 5) or in `rope_theta` + `rope_scaling` (earlier)."""
        spec = spec_from_hf_config(config, name)
        architectures = config.get("architectures") or [None]
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{name}: hidden_act {config['hidden_act']!r} is not supported")
        eos = config.get("eos_token_id")
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        theta, scaling = rope_settings(config, name)
        return cls(
            spec=spec,
            architecture=architectures[0],
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(config.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (as HF);
    with `residual`, of residual += x (in place), as `layer_ops.rms_norm`."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, residual)


def fuse_linears(parts) -> nn.Module | None:
    """One matmul for several of the same input (q/k/v, gate/up): their rows one after
    another, weights and biases alike. Quantized parts fuse when they share a format;
    None when the parts cannot be fused (dense and quantized, or two formats)."""
    if any(isinstance(p, QuantizedLinear) for p in parts):
        return fuse_quantized(parts)
    first = parts[0]
    fused = Linear(first.in_features, sum(p.out_features for p in parts),
                   bias=first.bias is not None)  # fmt: skip
    fused = fused.to(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(False)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        spec = config.spec
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = spec.num_attention_heads, spec.num_kv_heads
        self.head_dim = spec.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(spec.hidden_size, q_size, bias=config.qkv_bias)
        self.k_proj = Linear(spec.hidden_size, kv_size, bias=config.qkv_bias)
        self.v_proj = Linear(spec.hidden_size, kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(q_size, spec.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        self.qkv_proj: Linear | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Replace q/k/v_proj by one matmul (fewer, larger GEMMs); weights move, not copy twice."""
        fused = fuse_linears((self.q_proj, self.k_proj, self.v_proj))
        if fused is not None:
            del self.q_proj, self.k_proj, self.v_proj
            self.qkv_proj = fused

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v side by side, [T, (H + 2 kvH) * D]."""
        if self.qkv_proj is None:
            return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        return self.qkv_proj(x)

    def _norm_qk(self, qkv: torch.Tensor) -> None:
        """Qwen3's RMSNorm over each head of q and k, in place in `qkv`."""
        num_tokens, heads, kv_heads = qkv.shape[0], self.num_heads, self.num_kv_heads
        qk = qkv[:, : (heads + kv_heads) * self.head_dim].view(num_tokens, -1, self.head_dim)
        qk.copy_(torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1))

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, D/2]
        sin: torch.Tensor,
        kv: KVStore,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        qkv = self._project(x)
        if self.q_norm is not None:
            self._norm_qk(qkv)
        q, k, v = rope_and_store(qkv, cos, sin, self.num_heads, self.head_dim, kv,
                                 self.layer_idx, meta.slot_mapping)  # fmt: skip
        k_cache, v_cache = kv.layer(self.layer_idx)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale, self.sliding_window, k, v)
        return self.o_proj(o.reshape(x.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inter = config.spec.hidden_size, config.intermediate_size
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)
        self.gate_up_proj: Linear | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Replace gate_proj and up_proj by one matmul."""
        fused = fuse_linears((self.gate_proj, self.up_proj))
        if fused is not None:
            del self.gate_proj, self.up_proj
            self.gate_up_proj = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        hidden = config.spec.hidden_size
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]: the last sublayer's output (or the embeddings)
        residual: torch.Tensor | None,  # [T, hidden]: the stream x adds to (None: first layer)
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVStore,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (this layer's MLP output, the stream before it)
        """The residual stream is kept apart and each add fused with the norm after it
        (vLLM's arrangement): the stream is x_0 + sublayer outputs, as in transformers."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, cos, sin, kv, meta), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        spec = config.spec
        self.embed_tokens = nn.Embedding(config.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv: KVStore,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        x = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb(positions)  # [T, D/2] each, float32
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once for all layers
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, kv, meta)
        return self.norm(x, residual)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over a flat batch of new tokens, its K/V in a `KVStore`.

    `forward` returns the final hidden states of every new token; callers pick
    the rows they sample from and pass only those to `compute_logits`, so a
    long prefill never builds a [T, vocab] matrix. Positions past the RoPE tables
    (`max_position_embeddings`) are computed on the spot, for requests an eviction
    policy lets run past the context; the engine checks prompt lengths before they
    reach the model.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.spec.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with lm_head when the config ties them
        (again after loading, which replaces the embedding parameter)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv: KVStore,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        return self.model(input_ids, positions, kv, meta)

    def fuse_projections(self) -> None:
        """Serve with fused q/k/v and gate/up matmuls; parameter names stop matching HF's.

        Where the CPU's matmul is the BLAS one (no oneDNN), an untied LM head is also
        stored transposed ([hidden, vocab]): it is the one matrix too big for the CPU
        caches, and MKL reads it row-major 1.2-2x faster for the few rows a decode step
        has. oneDNN needs no copy. (A tied head stays shared either way.)
        """
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        if isinstance(self.lm_head, QuantizedLinear):
            return
        head = self.lm_head.weight
        if not ONEDNN and head.device.type == "cpu" and not self.config.tie_word_embeddings:
            self.lm_head_t = head.detach().t().contiguous()
            del self.lm_head

    def pack_weights(self) -> int:
        """Pack every matmul weight for the CPU's oneDNN (see `Linear.pack_weight`); a tied
        LM head stays plain, since the embedding lookup reads the same tensor. Returns how
        many weights were packed (0 off the CPU or outside float32)."""
        head = getattr(self, "lm_head", None)
        table = getattr(self.model.embed_tokens, "weight", None)
        shared = table is not None and getattr(head, "weight", None) is table
        return sum(
            module.pack_weight()
            for module in self.modules()
            if isinstance(module, Linear) and not (shared and module is head)
        )

    def rotate_keys(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys ([..., D], rotated at some position p) as if computed at p + delta, float32:
        what an eviction policy that moves tokens (streaming's sinks) needs of RoPE."""
        return self.model.rotary_emb.shift(keys, delta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        if getattr(self, "lm_head_t", None) is not None:
            return (hidden @ self.lm_head_t).float()
        return self.lm_head(hidden).float()
