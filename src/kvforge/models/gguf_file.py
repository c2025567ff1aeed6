"""Read GGUF files (llama.cpp's format): the model's shape, its weights, its tokenizer.

`read_gguf` parses the header only: metadata and the tensor directory, the data
stays memory-mapped. Its `config` is the metadata translated into the fields of
a Hugging Face config.json, so a GGUF model is parsed by the same code
(`ModelConfig.from_hf_config`, `spec_from_hf_config`) as a checkpoint directory;
`kvforge plan` needs nothing more. `load_gguf_state` then dequantizes one
tensor at a time into the serving dtype, with the `gguf` package's own
dequantizers, and undoes llama.cpp's q/k row order (`gguf_layout`).
"""

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from kvforge.errors import ConfigError
from kvforge.models.gguf_layout import (
    GGUF_ARCHITECTURES,
    ROPE_FREQS_TENSOR,
    rope_deinterleave,
    rope_permuted_heads,
)
from kvforge.models.quantized import GGUF_BLOCKS, QuantizedWeight

GGUF_MAGIC = b"GGUF"
Q = gguf.GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)  # fmt: skip
VOCABULARY_FIELDS = frozenset(
    f"tokenizer.ggml.{name}" for name in ("tokens", "scores", "token_type", "merges")
)
DEFAULT_ROPE_THETA = 10000.0
DEQUANTIZE_CHUNK_BYTES = 16 * 2**20  # float32 produced per dequantize call
DEFAULT_RMS_NORM_EPS = 1e-5  # llama.cpp's


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # "Q4_1", "F32", ...
    shape: tuple[int, ...]  # row-major, as HF stores it: [out, in] for a matrix
    num_bytes: int  # as stored in the file

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF file's header says: its architecture, an HF-style config, its tensors.

    `file_type` is the file's declared type ("Q4_1"), or the type holding most
    parameters when it declares none.
    """

    path: Path
    architecture: str  # the GGUF name: llama, qwen2, qwen3
    config: dict[str, Any]  # config.json fields (architectures, num_hidden_layers, ...)
    tensors: dict[str, GGUFTensor]
    file_type: str
    metadata: dict[str, Any]  # every scalar and short list of the header
    reader: gguf.GGUFReader = field(repr=False, compare=False)  # the data, memory-mapped

    def header_digest(self) -> str:
        """SHA-256 of the file's header (metadata and tensor directory, not the data):
        what names the file's tokenizer, chat template and shapes."""
        with self.path.open("rb") as f:
            return hashlib.sha256(f.read(self.reader.data_offset)).hexdigest()

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def num_bytes(self) -> int:
        return sum(t.num_bytes for t in self.tensors.values())


def is_gguf_file(path: Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def as_gguf(source: "str | Path | GGUFModel") -> "GGUFModel | None":
    """The GGUF model `source` is (read if it is a path to a .gguf file), or None."""
    if isinstance(source, GGUFModel):
        return source
    path = Path(source).expanduser()
    if path.is_file() and (path.suffix == ".gguf" or is_gguf_file(path)):
        return read_gguf(path)
    return None


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file")
    if not is_gguf_file(path):
        raise ConfigError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, OverflowError) as exc:
        raise ConfigError(f"{path}: truncated or corrupt GGUF file ({exc})") from None


def read_gguf(path: str | Path) -> GGUFModel:
    """Parse the header of a GGUF file; ConfigError for anything kvforge cannot run.

    Checks the architecture and every tensor's type against what is supported,
    and that the tensors' data lies inside the file, but reads no tensor data.
    """
    return _describe(Path(path).expanduser(), _open(Path(path).expanduser()))


def _describe(path: Path, reader: gguf.GGUFReader) -> GGUFModel:
    fields = dict(reader.fields)
    metadata = {  # all but the vocabulary's arrays: large, and read by the tokenizer alone
        name: value.contents() for name, value in fields.items() if name not in VOCABULARY_FIELDS
    }
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    tensors = {}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise ConfigError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which kvforge cannot "
                f"read; supported: {', '.join(q.name for q in SUPPORTED_TENSOR_TYPES)}"
            )
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, int(t.n_bytes))
    if not tensors:
        raise ConfigError(f"{path}: the GGUF file holds no tensors")
    config = _hf_config(path, arch, metadata, tensors, _vocab_length(fields))
    # The vocabulary's parsed arrays take ~150 MiB for a 50K-token file: the metadata
    # above has what kvforge reads (the tokenizer is converted from the file by itself).
    reader.fields.clear()
    del fields
    file_type = _file_type(metadata, tensors)
    return GGUFModel(path, arch, config, tensors, file_type, metadata, reader)


def _vocab_length(fields: dict[str, Any]) -> int | None:
    tokens = fields.get("tokenizer.ggml.tokens")
    return None if tokens is None else len(tokens.data)


def _file_type(metadata: dict[str, Any], tensors: dict[str, GGUFTensor]) -> str:
    declared = metadata.get("general.file_type")
    try:
        name = gguf.LlamaFileType(declared).name  # e.g. MOSTLY_Q4_1
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        counts: dict[str, int] = {}
        for t in tensors.values():
            counts[t.type_name] = counts.get(t.type_name, 0) + t.numel
        return max(counts, key=counts.__getitem__)


def _hf_config(
    path: Path,
    arch: str,
    metadata: dict[str, Any],
    tensors: dict[str, GGUFTensor],
    vocab_length: int | None,
) -> dict[str, Any]:
    """The metadata as config.json fields (see `spec_from_hf_config` for their meaning)."""

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    def required(key: str) -> int:
        value = get(key)
        if value is None:
            raise ConfigError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    num_heads = required("attention.head_count")
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per layer in some files
        if len(set(num_kv_heads)) != 1:
            raise ConfigError(f"{path}: a different KV head count per layer is not supported")
        num_kv_heads = num_kv_heads[0]
    hidden = required("embedding_length")
    # key_length is explicit when head_dim != hidden / heads; llama files may give only
    # the RoPE width, which is head_dim there (kvforge supports full rotary only).
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // num_heads
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ConfigError(f"{path}: partial rotary embeddings are not supported")
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConfigError(f"{path}: RoPE scaling {scaling!r} is not supported")
    embed = tensors.get("token_embd.weight")
    vocab = get("vocab_size") or vocab_length or (embed.shape[0] if embed else None)
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "num_hidden_layers": required("block_count"),
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": required("context_length"),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", DEFAULT_RMS_NORM_EPS)),
        "rope_theta": float(get("rope.freq_base", DEFAULT_ROPE_THETA)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "torch_dtype": "float32",  # what a GGUF file is served in on a CPU (see load_model)
    }
    if arch == "llama":  # llama files carry each bias when the model has it
        qkv_bias, o_bias = "blk.0.attn_q.bias" in tensors, "blk.0.attn_output.bias" in tensors
        if qkv_bias and not o_bias:  # q/k/v biases alone are Qwen2's shape (llamafied Qwen)
            config |= {"architectures": [GGUF_ARCHITECTURES["qwen2"]], "model_type": "qwen2"}
        else:
            config["attention_bias"] = qkv_bias or o_bias
    for key in ("bos_token_id", "eos_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = int(value)
    return config


def eos_token_ids(model: GGUFModel) -> tuple[int, ...]:
    """The file's end-of-sequence ids: EOS, and end-of-turn/-message where it names them."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = (model.metadata.get(f"tokenizer.ggml.{k}") for k in keys)
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def rope_freq_divisors(model: GGUFModel) -> tuple[float, ...] | None:
    """A Llama 3.1 file's RoPE scaling (each channel pair's frequency is divided by its
    entry), in float32 whatever the serving dtype: bf16 would move the angles."""
    for t in model.reader.tensors:
        if t.name == ROPE_FREQS_TENSOR:
            return tuple(gguf.quants.dequantize(t.data, t.tensor_type).astype(float).tolist())
    return None


def iter_gguf_tensors(
    model: GGUFModel,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    keep: Callable[[str, str], bool] = lambda name, type_name: False,
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(GGUF name, tensor in HF row order and `dtype`) for every tensor, one at a time.

    Each tensor is dequantized from the memory-mapped file by the `gguf` package,
    `DEQUANTIZE_CHUNK_BYTES` of float32 at a time, straight into a tensor of
    `dtype` (gguf's dequantizers hold a few float32 copies of what they are given:
    in chunks, that stays small beside the model) — but for those `keep(name, type
    name)` accepts, which come as `QuantizedWeight`s of the file's own blocks (Q4_0,
    Q4_1, Q8_0). q/k rows of `llama` files are then put back in HF's order.
    """
    for t in model.reader.tensors:
        data = t.data  # [rows, bytes or values per row], memory-mapped
        shape = model.tensors[t.name].shape
        heads = rope_permuted_heads(model.architecture, t.name, num_heads, num_kv_heads)
        if t.tensor_type.name in GGUF_BLOCKS and keep(t.name, t.tensor_type.name):
            weight = QuantizedWeight.from_gguf(t.tensor_type.name, data.reshape(shape[0], -1))
            if heads is not None:
                order = rope_deinterleave(torch.arange(shape[0]), heads)
                weight = weight.rows(order)
            yield t.name, weight
            continue
        out = torch.empty(shape, dtype=dtype)
        rows = out.view(-1, shape[-1])
        step = max(1, DEQUANTIZE_CHUNK_BYTES // (4 * shape[-1]))
        flat = data.reshape(rows.shape[0], -1)
        for start in range(0, rows.shape[0], step):
            chunk = gguf.quants.dequantize(flat[start : start + step], t.tensor_type)
            # a copy: F32 chunks are read-only views of the mapped file
            rows[start : start + step] = torch.from_numpy(np.array(chunk, dtype=np.float32))
        if heads is not None:
            out = rope_deinterleave(out, heads)
        yield t.name, out
