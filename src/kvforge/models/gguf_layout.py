"""Where a GGUF file's layout differs from a Hugging Face checkpoint's, in one place.

The reader (`gguf_file`) and the writer (`gguf_export`) both go through this
module, so a tensor name or a row order is defined once.

* Architectures. GGUF names a family by `general.architecture` ("llama",
  "qwen2", "qwen3"); its hyperparameters are keys under that name
  (`llama.block_count`, `qwen2.attention.head_count_kv`, ...).
* Tensor names. `model.layers.3.self_attn.q_proj.weight` is
  `blk.3.attn_q.weight`; a missing `output.weight` means the LM head is tied
  to `token_embd.weight`.
* Shapes. GGUF lists dimensions fastest-first (`[in, out]` for a matrix); the
  `gguf` reader hands the data over row-major (`[out, in]`), as HF stores it.
* RoPE pairs. transformers rotates channel i of a head with channel i + d/2
  (rotate_half). llama.cpp's converter reorders the rows of q_proj and k_proj
  of `llama`-arch files (not `qwen2`/`qwen3`, whose graph uses rotate_half
  too) so that the pair becomes 2i, 2i + 1: GGUF row 2i = HF row i, GGUF row
  2i + 1 = HF row i + d/2. `rope_interleave` does it, `rope_deinterleave`
  undoes it, on weights and biases alike.
"""

from typing import TypeVar

import gguf
import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)  # numpy (the exporter) or torch (the reader)

# GGUF architecture -> the HF class (and so the model_type) that runs it.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# HF class -> the GGUF architecture kvforge writes it as. Mistral is written as
# llama (llama.cpp's own converter does the same); its sliding window is not.
HF_TO_GGUF_ARCHITECTURE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# Architectures whose q/k rows llama.cpp's converter interleaves (see the docstring).
PERMUTED_ARCHITECTURES = ("llama",)

# HF parameter name inside a layer -> gguf tensor kind.
_LAYER_TENSORS = {
    "input_layernorm": gguf.MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "self_attn.q_norm": gguf.MODEL_TENSOR.ATTN_Q_NORM,
    "self_attn.k_norm": gguf.MODEL_TENSOR.ATTN_K_NORM,
    "post_attention_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": gguf.MODEL_TENSOR.FFN_DOWN,
}
_GLOBAL_TENSORS = {
    "model.embed_tokens": gguf.MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": gguf.MODEL_TENSOR.OUTPUT,
}
ROPE_FREQS_TENSOR = f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight"


def gguf_tensor_name(hf_name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'; None if GGUF has none."""
    stem, _, suffix = hf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_TENSORS:
        return f"{gguf.TENSOR_NAMES[_GLOBAL_TENSORS[stem]]}.{suffix}"
    parts = stem.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_TENSORS:
        template = gguf.TENSOR_NAMES[_LAYER_TENSORS[parts[3]]]
        return f"{template.format(bid=int(parts[2]))}.{suffix}"
    return None


def rope_permuted_heads(gguf_arch: str, gguf_name: str, num_heads: int, num_kv_heads: int):
    """How many heads the rows of `gguf_name` are interleaved over, or None if they are not."""
    if gguf_arch not in PERMUTED_ARCHITECTURES:
        return None
    kind = gguf_name.split(".")[-2]
    return {"attn_q": num_heads, "attn_k": num_kv_heads}.get(kind)


def rope_interleave(w: Array, num_heads: int) -> Array:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head; w is [H*D, in] or [H*D]."""
    rest = w.shape[1:]
    half = w.shape[0] // num_heads // 2
    # [H, 2, D/2, ...] -> [H, D/2, 2, ...]: row (h, j, i) moves to (h, i, j), i.e. 2i + j.
    return w.reshape(num_heads, 2, half, *rest).swapaxes(1, 2).reshape(w.shape)


def rope_deinterleave(w: Array, num_heads: int) -> Array:
    """The inverse of `rope_interleave`."""
    rest = w.shape[1:]
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)  # a copy
