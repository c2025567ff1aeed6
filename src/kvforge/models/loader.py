"""Load a Hugging Face checkpoint directory: config.json, safetensors weights, tokenizer.

The model is built on the meta device (no memory), every tensor is checked
against the config's shapes from the safetensors headers before any weight is
read, then each tensor is read from its memory-mapped file, converted once to
the target dtype and device, and assigned in place of the meta parameter, so
weights are never held twice.
"""

import json
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from tqdm import tqdm

from kvforge.config import load_hf_config, normalize_dtype
from kvforge.errors import ConfigError
from kvforge.kvcache.store import TORCH_DTYPES
from kvforge.models.checkpoint import (
    CheckpointInfo,
    TensorInfo,
    read_safetensors_header,
    scan_checkpoint,
)
from kvforge.models.llama import LLAMA_ARCHITECTURES, LlamaForCausalLM, ModelConfig

# HF architecture name -> the class that runs it; adding a family is one entry.
SUPPORTED_ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = dict.fromkeys(
    LLAMA_ARCHITECTURES, LlamaForCausalLM
)
# Tensors some checkpoints carry that we recompute rather than load.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (`ByteTokenizer` and `HFTokenizer` have it)."""

    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def load_model(
    path: str | Path, dtype: str = "auto", device: str | torch.device = "cpu"
) -> LlamaForCausalLM:
    """Build the model described by `path`/config.json and load its safetensors weights.

    dtype "auto" takes the config's torch_dtype (or `dtype`), else the dtype most
    weights are stored in; otherwise one of fp32, fp16, bf16. The returned
    model's `config.spec.dtype` is the dtype its weights were loaded in.
    """
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
    state = _read_tensors(directory, expected, tensors, TORCH_DTYPES[dtype_name], device)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.to(device)  # moves the RoPE tables; parameters are already there
    if any(p.is_meta for p in model.parameters()):
        raise AssertionError("a parameter was not loaded")  # a bug: _check_tensors passed
    return model.eval().requires_grad_(False)


def _checkpoint_tensors(checkpoint: CheckpointInfo) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor name of the checkpoint -> its file and header entry."""
    tensors = {}
    for file in checkpoint.files:
        for tensor in read_safetensors_header(file):
            tensors.setdefault(tensor.name, (file, tensor))
    return tensors


def _resolve_dtype(
    dtype: str, config: dict[str, Any], checkpoint: CheckpointInfo, directory: Path
) -> str:
    if dtype == "auto":
        raw = config.get("torch_dtype") or config.get("dtype")
        name = normalize_dtype(raw) if raw is not None else checkpoint.dtype or "fp32"
    else:
        name = normalize_dtype(dtype)
    if name not in TORCH_DTYPES:
        raise ConfigError(
            f"{directory}: weights cannot be loaded as {name}; choose one of: "
            f"{', '.join(TORCH_DTYPES)}"
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


class HFTokenizer:
    """A transformers tokenizer behind the engine's small `Tokenizer` interface.

    `encode` adds special tokens as the tokenizer does by default (BOS for
    Llama); `decode` skips them. `eos_token_ids` joins the tokenizer's EOS with
    those of config.json and generation_config.json (chat models end turns
    with tokens other than the tokenizer's EOS).
    """

    def __init__(self, tokenizer: Any, extra_eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tokenizer = tokenizer
        eos = {tokenizer.eos_token_id, *extra_eos_token_ids}
        self.eos_token_ids = frozenset(i for i in eos if i is not None)
        self.bos_token_id: int | None = tokenizer.bos_token_id
        self.vocab_size = len(tokenizer)

    @property
    def hf_tokenizer(self) -> Any:
        """The transformers tokenizer underneath (its chat template, for the server)."""
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """The tokenizer saved in a checkpoint directory; ConfigError if there is none."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a checkpoint directory")
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{directory}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})"
        )
    from transformers import AutoTokenizer  # slow to import; only needed here

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory}: cannot load the tokenizer: {exc}") from None
    return HFTokenizer(tokenizer, _config_eos_ids(directory))


def _config_eos_ids(directory: Path) -> tuple[int, ...]:
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        try:
            eos = json.loads((directory / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: the tokenizer's own EOS still applies
        ids += [eos] if isinstance(eos, int) else [i for i in eos or () if isinstance(i, int)]
    return tuple(ids)
