"""Load a model: a Hugging Face checkpoint directory (config.json, safetensors weights,
tokenizer) or a GGUF file (llama.cpp's format, see `gguf_file`).

The model is built on the meta device (no memory), every tensor is checked
against the config's shapes from the safetensors headers before any weight is
read, then each tensor is read from its memory-mapped file, converted once to
the target dtype and device, and assigned in place of the meta parameter, so
weights are never held twice. A GGUF file goes the same way, each tensor
dequantized on its own (`gguf_file.iter_gguf_tensors`).
"""

import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from kvforge import kernels
from kvforge.config import load_hf_config
from kvforge.dtypes import FLOAT_DTYPES, normalize_dtype, torch_dtype
from kvforge.errors import ConfigError
from kvforge.models.checkpoint import (
    CheckpointInfo,
    TensorInfo,
    read_safetensors_header,
    scan_checkpoint,
)
from kvforge.models.gguf_file import (
    GGUFModel,
    as_gguf,
    eos_token_ids,
    iter_gguf_tensors,
    rope_freq_divisors,
)
from kvforge.models.gguf_layout import ROPE_FREQS_TENSOR, gguf_tensor_name
from kvforge.models.llama import LLAMA_ARCHITECTURES, LlamaForCausalLM, ModelConfig
from kvforge.models.quantized import (
    WEIGHT_FORMATS,
    QuantizedWeight,
    apply_weights,
    keeps_gguf_blocks,
)

# HF architecture name -> the class that runs it; adding a family is one entry.
SUPPORTED_ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = dict.fromkeys(
    LLAMA_ARCHITECTURES, LlamaForCausalLM
)
# Tensors some checkpoints carry that we recompute rather than load.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    path: str | Path | GGUFModel,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    weights: str = "auto",
) -> LlamaForCausalLM:
    """Build the model a checkpoint directory or a GGUF file describes, and load its weights.

    dtype "auto" takes the config's torch_dtype (or `dtype`), else the dtype most
    weights are stored in; for a GGUF file, fp32 on a CPU and bf16 on CUDA (its
    quantized weights are dequantized at load). Otherwise one of fp32, fp16, bf16.
    The returned model's `config.spec.dtype` is the dtype it computes in.
    `weights`: "auto" serves a GGUF file's Q4_0/Q4_1/Q8_0 matmul weights from their
    own blocks (`models.quantized`) and the rest dense; "int8"/"int4" serve every
    matmul weight quantized (the file's blocks where they are that format, else
    quantized at load); a float dtype, dense.
    A GGUF file whose header was read already may be passed as its `GGUFModel`.
    """
    if weights not in ("auto", *FLOAT_DTYPES, *WEIGHT_FORMATS):
        raise ConfigError(
            f"weights_dtype must be one of auto, {', '.join((*FLOAT_DTYPES, *WEIGHT_FORMATS))}, "
            f"got {weights!r}"
        )
    info = as_gguf(path)
    if info is not None:
        return _load_gguf(info, dtype, device, weights)
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a checkpoint directory")
    config_dict = load_hf_config(directory / "config.json")
    architecture = (config_dict.get("architectures") or [None])[0]
    model_class = SUPPORTED_ARCHITECTURES.get(architecture)
    if model_class is None:
        problem = (
            "config.json names no architecture"
            if architecture is None
            else f"architecture {architecture} is not supported"
        )
        raise ConfigError(
            f"{directory}: {problem}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    checkpoint = scan_checkpoint(directory)  # follows model.safetensors.index.json shards
    if checkpoint is None:
        raise ConfigError(
            f"{directory}: no *.safetensors files (only safetensors checkpoints are supported)"
        )
    dtype_name = _resolve_dtype(dtype, config_dict, checkpoint, directory)
    config = ModelConfig.from_hf_config(config_dict, directory.name)
    config = replace(config, spec=replace(config.spec, dtype=dtype_name))

    with torch.device("meta"):
        model = model_class(config)
    expected = dict(model.state_dict())  # name -> meta tensor with the shape the config implies
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]  # shared with embed_tokens; a stored copy is ignored
    tensors = _checkpoint_tensors(checkpoint)
    _check_tensors(directory, expected, tensors)
    state = _read_tensors(directory, expected, tensors, torch_dtype(dtype_name), device)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.to(device)  # moves the RoPE tables; parameters are already there
    if any(p.is_meta for p in model.parameters()):
        raise AssertionError("a parameter was not loaded")  # a bug: _check_tensors passed
    apply_weights(model, weights, {})  # int8/int4: quantized from the loaded values
    return model.eval().requires_grad_(False)


def _load_gguf(info: GGUFModel, dtype: str, device: str | torch.device, weights: str
               ) -> LlamaForCausalLM:  # fmt: skip
    """The model of a GGUF file (see `load_model`)."""
    path = info.path
    if dtype == "auto":
        dtype_name = "bf16" if torch.device(device).type == "cuda" else "fp32"
    else:
        dtype_name = _resolve_dtype(dtype, {}, None, path)
    config = ModelConfig.from_hf_config(info.config, path.name)
    config = replace(
        config,
        spec=replace(config.spec, dtype=dtype_name),
        eos_token_ids=eos_token_ids(info) or config.eos_token_ids,
        rope_freq_divisors=rope_freq_divisors(info),  # Llama 3.1 files' RoPE scaling
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # GGUF name -> our parameter name, for every parameter the file must provide
    expected = {
        gguf_tensor_name(name): name
        for name in model.state_dict()
        if not (name == "lm_head.weight" and config.tie_word_embeddings)
    }
    shapes = dict(model.state_dict())
    missing = sorted(expected.keys() - info.tensors.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" * (len(missing) > 5))
        raise ConfigError(f"{path}: the GGUF file lacks tensor(s) {shown}")
    for gguf_name, name in expected.items():
        shape = info.tensors[gguf_name].shape
        if shape != tuple(shapes[name].shape):
            raise ConfigError(
                f"{path}: tensor {gguf_name} has shape {list(shape)}, "
                f"the metadata implies {list(shapes[name].shape)}"
            )
    unexpected = sorted(info.tensors.keys() - expected.keys() - {ROPE_FREQS_TENSOR})
    if unexpected:
        raise ConfigError(
            f"{path}: tensor(s) {', '.join(unexpected[:5])} have no place in a "
            f"{info.architecture} model"
        )
    state, taken = {}, {}
    heads = (config.spec.num_attention_heads, config.spec.num_kv_heads)

    # "auto" keeps the file's blocks where kvforge's kernels run them (a CPU with AVX-512,
    # float32); elsewhere a per-call dequantization would be slower than dense weights
    fast = torch.device(device).type == "cpu" and dtype_name == "fp32" and kernels.cpu()
    if weights == "auto" and not fast:
        weights = dtype_name

    def keep(gguf_name: str, type_name: str) -> bool:
        name = expected.get(gguf_name)
        return name is not None and keeps_gguf_blocks(name, type_name, weights)

    tensors = iter_gguf_tensors(info, torch_dtype(dtype_name), *heads, keep=keep)
    with tqdm(total=len(info.tensors), desc=f"loading {path.name}", unit="tensor",
              disable=None) as bar:  # fmt: skip
        for gguf_name, tensor in tensors:
            if isinstance(tensor, QuantizedWeight):
                taken[expected[gguf_name]] = tensor.to(device)
            elif gguf_name != ROPE_FREQS_TENSOR:  # read apart, in float32
                state[expected[gguf_name]] = tensor.to(device)
            bar.update()
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    apply_weights(model, weights, taken)
    model.to(device)
    if any(p.is_meta for p in model.parameters()):
        raise AssertionError("a parameter was not loaded")  # a bug: the checks above passed
    return model.eval().requires_grad_(False)


def _checkpoint_tensors(checkpoint: CheckpointInfo) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor name of the checkpoint -> its file and header entry."""
    tensors = {}
    for file in checkpoint.files:
        for tensor in read_safetensors_header(file):
            tensors.setdefault(tensor.name, (file, tensor))
    return tensors


def _resolve_dtype(
    dtype: str, config: dict[str, Any], checkpoint: CheckpointInfo | None, directory: Path
) -> str:
    if dtype == "auto":
        raw = config.get("torch_dtype") or config.get("dtype")
        name = normalize_dtype(raw) if raw is not None else checkpoint.dtype or "fp32"
    else:
        name = normalize_dtype(dtype)
    if name not in FLOAT_DTYPES:
        raise ConfigError(
            f"{directory}: weights cannot be loaded as {name}; choose one of: "
            f"{', '.join(FLOAT_DTYPES)}"
        )
    return name


def _check_tensors(
    directory: Path,
    expected: dict[str, torch.Tensor],
    tensors: dict[str, tuple[Path, TensorInfo]],
) -> None:
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ConfigError(f"{directory}: checkpoint is missing tensor(s) {shown}")
    for name, meta in expected.items():
        shape = tensors[name][1].shape
        if shape != tuple(meta.shape):
            raise ConfigError(
                f"{directory}: tensor {name} has shape {list(shape)}, "
                f"the config implies {list(meta.shape)}"
            )
    unexpected = sorted(
        name
        for name in tensors.keys() - expected.keys()
        if not name.endswith(IGNORED_TENSOR_SUFFIXES) and name != "lm_head.weight"
    )
    if unexpected:
        warnings.warn(
            f"{directory}: ignoring {len(unexpected)} tensor(s) the model does not use: "
            f"{', '.join(unexpected[:5])}",
            stacklevel=3,
        )


def _read_tensors(
    directory: Path,
    expected: dict[str, torch.Tensor],
    tensors: dict[str, tuple[Path, TensorInfo]],
    dtype: torch.dtype,
    device: str | torch.device,
) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in expected:
        by_file[tensors[name][0]].append(name)
    state = {}
    with tqdm(
        total=len(expected), desc=f"loading {directory.name}", unit="tensor", disable=None
    ) as bar:
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:  # memory-mapped
                for name in names:
                    state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
                    bar.update()
    return state
