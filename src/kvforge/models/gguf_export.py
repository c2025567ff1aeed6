"""Convert a Hugging Face Llama-family checkpoint to GGUF, so llama.cpp runs the same weights.

The benchmarks compare kvforge with llama.cpp on one checkpoint, and the tests
check kvforge's GGUF reader against transformers' on files of every shape; this
module writes them, using only the `gguf` package's writer, quantizers and name
constants. Llama and Mistral are written as GGUF arch "llama", Qwen2 as "qwen2"
(q/k/v biases), Qwen3 as "qwen3" (q/k norms); `gguf_layout` has the names and the
RoPE row order, which differ from HF's for "llama" only.

Tokenizer: test checkpoints have none, so every file gets a placeholder SPM
vocabulary of exactly vocab_size tokens (unknown, BOS and EOS at the config's
ids, the 256 byte tokens, then fillers). It makes llama.cpp load the file and
accept token ids; text tokenization with it is meaningless, so benchmarks pass
token ids, never text.

Tensors are read one at a time from the memory-mapped safetensors files and
written straight to the output, so converting needs the memory of the largest
tensor, not of the model. Sliding-window attention (Mistral) is not written:
llama.cpp's "llama" graph attends to the whole context, which matches kvforge
only while the context fits in the window.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from kvforge.config import load_hf_config
from kvforge.errors import ConfigError
from kvforge.models.checkpoint import read_safetensors_header, scan_checkpoint
from kvforge.models.gguf_layout import (
    HF_TO_GGUF_ARCHITECTURE,
    ROPE_FREQS_TENSOR,
    gguf_tensor_name,
    rope_interleave,
    rope_permuted_heads,
)
from kvforge.models.llama import ModelConfig
from kvforge.models.loader import IGNORED_TENSOR_SUFFIXES
from kvforge.models.rope import rope_inv_freq

EXPORTABLE_ARCHITECTURES = tuple(HF_TO_GGUF_ARCHITECTURE)
_Q = gguf.GGMLQuantizationType
# Our dtype name -> (tensor type of 2-D weights, file type); 1-D tensors stay F32.
GGUF_DTYPES = {
    "f32": (_Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (_Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (_Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (_Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (_Q.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (_Q.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (_Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (_Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
NUM_BYTE_TOKENS = 256
DEFAULT_BOS_TOKEN_ID = 1
DEFAULT_EOS_TOKEN_ID = 2


def placeholder_vocab(
    vocab_size: int, bos_token_id: int, eos_token_id: int
) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a minimal SPM vocabulary llama.cpp accepts.

    BOS and EOS are control tokens at the config's ids, "<unk>" takes the
    lowest free id, the 256 byte tokens the next free ids (llama.cpp looks up
    "<0x0A>" as the newline token), and the rest are normal fillers "<tok_N>".
    """
    special = {bos_token_id: "<s>", eos_token_id: "</s>"}
    if vocab_size < len(special) + 1 + NUM_BYTE_TOKENS or max(special) >= vocab_size:
        raise ConfigError(
            f"vocab_size {vocab_size} cannot hold the placeholder vocabulary: it needs "
            f"{len(special) + 1 + NUM_BYTE_TOKENS} tokens and BOS/EOS ids below vocab_size"
        )
    tokens = [f"<tok_{i}>" for i in range(vocab_size)]
    types = [gguf.TokenType.NORMAL] * vocab_size
    for token_id, text in special.items():
        tokens[token_id], types[token_id] = text, gguf.TokenType.CONTROL
    free = (i for i in range(vocab_size) if i not in special)
    unk_id = next(free)
    tokens[unk_id], types[unk_id] = "<unk>", gguf.TokenType.UNKNOWN
    for byte, token_id in zip(range(NUM_BYTE_TOKENS), free, strict=False):
        tokens[token_id], types[token_id] = f"<0x{byte:02X}>", gguf.TokenType.BYTE
    return tokens, [0.0] * vocab_size, [int(t) for t in types]


def _model_config(config: dict, name: str) -> ModelConfig:
    architecture = (config.get("architectures") or [None])[0]
    if architecture not in EXPORTABLE_ARCHITECTURES:
        raise ConfigError(
            f"{name}: cannot export architecture {architecture} to GGUF; "
            f"supported: {', '.join(EXPORTABLE_ARCHITECTURES)}"
        )
    return ModelConfig.from_hf_config(config, name)  # validates shapes, RoPE, activation


def _first_id(value: object, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)  # type: ignore[call-overload]


def _add_metadata(writer: gguf.GGUFWriter, model: ModelConfig, config: dict, dtype: str) -> None:
    spec = model.spec
    writer.add_name(spec.name)
    writer.add_file_type(GGUF_DTYPES[dtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(model.vocab_size)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(model.intermediate_size)
    writer.add_head_count(spec.num_attention_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)  # explicit: head_dim need not be hidden / heads
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(model.rope_theta)
    writer.add_layer_norm_rms_eps(model.rms_norm_eps)

    bos_id = _first_id(config.get("bos_token_id"), DEFAULT_BOS_TOKEN_ID)
    eos_id = _first_id(config.get("eos_token_id"), DEFAULT_EOS_TOKEN_ID)
    tokens, scores, types = placeholder_vocab(model.vocab_size, bos_id, eos_id)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_unk_token_id(tokens.index("<unk>"))
    writer.add_add_bos_token(False)  # prompts are token ids that carry their own BOS


def export_gguf(checkpoint_dir: str | Path, out_path: str | Path, dtype: str = "f32") -> Path:
    """Write the checkpoint in `checkpoint_dir` as a GGUF file at `out_path`; returns out_path.

    dtype (one of `GGUF_DTYPES`: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0) is the
    type of the matrices, quantized by the `gguf` package; norms, biases, RoPE factors
    and a matrix whose rows do not split into the type's blocks stay float32.
    Raises ConfigError for an unsupported architecture, a missing or unexpected
    tensor, or a vocabulary too small for the placeholder tokenizer.
    """
    directory = Path(checkpoint_dir).expanduser()
    out_path = Path(out_path)
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"unknown GGUF dtype {dtype!r}; known: {', '.join(GGUF_DTYPES)}")
    config = load_hf_config(directory / "config.json")
    model = _model_config(config, directory.name)
    arch = HF_TO_GGUF_ARCHITECTURE[model.architecture]
    if model.qk_norm and arch != "qwen3":
        raise ConfigError(f"{directory.name}: q/k norms cannot be exported to GGUF '{arch}'")
    checkpoint = scan_checkpoint(directory)
    if checkpoint is None:
        raise ConfigError(f"{directory}: no *.safetensors files")
    entries = _plan_tensors(directory, model, arch, checkpoint.files, GGUF_DTYPES[dtype][0])
    rope_factors = _llama3_rope_factors(model)

    writer = gguf.GGUFWriter(out_path, arch)
    _add_metadata(writer, model, config, dtype)
    # The header lists every tensor's shape before any data, so shapes come from
    # the safetensors headers and the data is then read, converted and written
    # one tensor at a time, in the same order: memory stays at one tensor.
    if rope_factors is not None:
        writer.add_tensor_info(
            ROPE_FREQS_TENSOR, rope_factors.shape, rope_factors.dtype, rope_factors.nbytes
        )
    for entry in entries:
        byte_shape = gguf.quant_shape_to_byte_shape(entry.shape, entry.qtype)
        writer.add_tensor_info(entry.name, entry.shape, np.dtype(np.float32),
                               int(np.prod(byte_shape)), raw_dtype=entry.qtype)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if rope_factors is not None:
        writer.write_tensor_data(rope_factors)
    handles: dict[Path, Any] = {}
    for entry in entries:
        if entry.file not in handles:
            handles[entry.file] = safe_open(entry.file, framework="pt")
        writer.write_tensor_data(_convert(entry, handles[entry.file], model, arch))
    writer.close()
    return out_path


@dataclass(frozen=True)
class _Entry:
    name: str  # GGUF name
    file: Path
    hf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType  # as written


def _plan_tensors(
    directory: Path,
    model: ModelConfig,
    arch: str,
    files: tuple[Path, ...],
    matrix_type: gguf.GGMLQuantizationType,
) -> list[_Entry]:
    """Every tensor to write, checked against the shapes the config implies."""
    block_size = gguf.GGML_QUANT_SIZES[matrix_type][0]
    entries: dict[str, _Entry] = {}
    for file in files:
        for tensor in read_safetensors_header(file):
            if tensor.name.endswith(IGNORED_TENSOR_SUFFIXES):
                continue  # e.g. rotary_emb.inv_freq, which llama.cpp recomputes
            name = gguf_tensor_name(tensor.name)
            if name is None:
                raise ConfigError(f"{directory}: no GGUF '{arch}' tensor for {tensor.name}")
            if name in entries:
                continue  # a sharded checkpoint may repeat a tensor; the first one counts
            if name.startswith("output.") and model.tie_word_embeddings:
                continue  # tied: llama.cpp reuses token_embd when `output` is absent
            quantizable = len(tensor.shape) == 2 and tensor.shape[1] % block_size == 0
            qtype = matrix_type if quantizable else _Q.F32
            entries[name] = _Entry(name, file, tensor.name, tensor.shape, qtype)
    expected = _expected_shapes(model)
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise ConfigError(f"{directory}: checkpoint lacks tensors for {', '.join(missing[:5])}")
    for name, entry in entries.items():
        if name not in expected:
            raise ConfigError(f"{directory}: {entry.hf_name} is not part of the config's model")
        if entry.shape != expected[name]:
            raise ConfigError(
                f"{directory}: {entry.hf_name} has shape {entry.shape}, "
                f"the config implies {expected[name]}"
            )
    return [entries[name] for name in expected]  # llama.cpp's usual order


def _expected_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    spec = model.spec
    hidden, ffn = spec.hidden_size, model.intermediate_size
    q_rows, kv_rows = spec.num_attention_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {
        "token_embd.weight": (model.vocab_size, hidden),
        "output_norm.weight": (hidden,),
    }
    if not model.tie_word_embeddings:
        shapes["output.weight"] = (model.vocab_size, hidden)
    for i in range(spec.num_layers):
        layer = {
            "attn_norm.weight": (hidden,),
            "attn_q.weight": (q_rows, hidden),
            "attn_k.weight": (kv_rows, hidden),
            "attn_v.weight": (kv_rows, hidden),
            "attn_output.weight": (hidden, q_rows),
            "ffn_norm.weight": (hidden,),
            "ffn_gate.weight": (ffn, hidden),
            "ffn_up.weight": (ffn, hidden),
            "ffn_down.weight": (hidden, ffn),
        }
        if model.qk_norm:
            layer |= {
                "attn_q_norm.weight": (spec.head_dim,),
                "attn_k_norm.weight": (spec.head_dim,),
            }
        if model.qkv_bias:
            layer |= {
                "attn_q.bias": (q_rows,),
                "attn_k.bias": (kv_rows,),
                "attn_v.bias": (kv_rows,),
            }
        if model.o_bias:
            layer["attn_output.bias"] = (hidden,)
        shapes |= {f"blk.{i}.{key}": shape for key, shape in layer.items()}
    return shapes


def _convert(entry: _Entry, handle: Any, model: ModelConfig, arch: str) -> np.ndarray:
    array = handle.get_tensor(entry.hf_name).to(torch.float32).numpy()  # bf16: no numpy dtype
    spec = model.spec
    heads = rope_permuted_heads(arch, entry.name, spec.num_attention_heads, spec.num_kv_heads)
    if heads is not None:
        array = rope_interleave(array, heads)
    return gguf.quants.quantize(np.ascontiguousarray(array), entry.qtype)


def _llama3_rope_factors(model: ModelConfig) -> np.ndarray | None:
    """llama.cpp divides each pair's base frequency by its entry in `rope_freqs`."""
    if model.rope_scaling is None:
        return None
    base = rope_inv_freq(model.spec.head_dim, model.rope_theta, None)
    scaled = rope_inv_freq(model.spec.head_dim, model.rope_theta, model.rope_scaling)
    return (base / scaled).numpy().astype(np.float32)
