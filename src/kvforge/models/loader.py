"""Load a model: a Hugging Face checkpoint directory (config.json, safetensors weights,
tokenizer) or a GGUF file (llama.cpp's format, see `gguf_file`).

The model is built on the meta device (no memory), every tensor is checked
against the config's shapes from the safetensors headers before any weight is
read, then each tensor is read from its memory-mapped file, converted once to
the target dtype and device, and assigned in place of the meta parameter, so
weights are never held twice. A GGUF file goes the same way, each tensor
dequantized on its own (`gguf_file.iter_gguf_tensors`).
"""

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from tqdm import tqdm

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
    eos_token_ids,
    is_gguf_file,
    iter_gguf_tensors,
    read_gguf,
    rope_freq_divisors,
)
from kvforge.models.gguf_layout import ROPE_FREQS_TENSOR, gguf_tensor_name
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
    path: str | Path | GGUFModel, dtype: str = "auto", device: str | torch.device = "cpu"
) -> LlamaForCausalLM:
    """Build the model a checkpoint directory or a GGUF file describes, and load its weights.

    dtype "auto" takes the config's torch_dtype (or `dtype`), else the dtype most
    weights are stored in; for a GGUF file, fp32 on a CPU and bf16 on CUDA (its
    quantized weights are dequantized at load). Otherwise one of fp32, fp16, bf16.
    The returned model's `config.spec.dtype` is the dtype its weights were loaded in.
    A GGUF file whose header was read already may be passed as its `GGUFModel`.
    """
    if isinstance(path, GGUFModel) or _is_gguf(Path(path).expanduser()):
        return _load_gguf(_gguf(path), dtype, device)
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
    return model.eval().requires_grad_(False)


def _is_gguf(path: Path) -> bool:
    return path.is_file() and (path.suffix == ".gguf" or is_gguf_file(path))


def _gguf(source: str | Path | GGUFModel) -> GGUFModel:
    return source if isinstance(source, GGUFModel) else read_gguf(source)


def _load_gguf(info: GGUFModel, dtype: str, device: str | torch.device) -> LlamaForCausalLM:
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
    state = {}
    weights_dtype = torch_dtype(dtype_name)
    heads = (config.spec.num_attention_heads, config.spec.num_kv_heads)
    with tqdm(total=len(info.tensors), desc=f"loading {path.name}", unit="tensor",
              disable=None) as bar:  # fmt: skip
        for gguf_name, tensor in iter_gguf_tensors(info, weights_dtype, *heads):
            if gguf_name != ROPE_FREQS_TENSOR:  # read apart, in float32
                state[expected[gguf_name]] = tensor.to(device)
            bar.update()
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
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


def load_tokenizer(path: str | Path | GGUFModel) -> HFTokenizer:
    """The tokenizer saved in a checkpoint directory or a GGUF file; ConfigError if none.

    A GGUF file's vocabulary, merges, special tokens, BOS handling and chat template
    are in its metadata; transformers converts them to a fast tokenizer.
    """
    if isinstance(path, GGUFModel) or _is_gguf(Path(path).expanduser()):
        return _load_gguf_tokenizer(_gguf(path))
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


def _load_gguf_tokenizer(info: GGUFModel, cache_dir: Path | None = None) -> HFTokenizer:
    """The file's tokenizer, converted by transformers (~4 s for a 50K vocabulary: it
    parses the file again) once, then read from a converted copy kept in the cache
    directory (~0.3 s). The copy's name hashes the file's whole header (vocabulary,
    special tokens, chat template) and the transformers and tokenizers versions, so
    another file, an edited one, or another conversion never reads it."""
    path = info.path
    if "tokenizer.ggml.model" not in info.metadata:
        raise ConfigError(f"{path}: the GGUF file has no tokenizer")
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    versions = f"{transformers.__version__}:{tokenizers.__version__}"
    key = hashlib.sha256(f"{info.header_digest()}:{versions}".encode()).hexdigest()[:24]
    cached = (cache_dir or kvforge_cache_dir()) / "tokenizers" / key
    tokenizer, damaged = None, False
    if (cached / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception:  # any unreadable copy (tokenizers raises bare Exceptions)
            damaged = True  # is converted again, and replaced
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot convert the GGUF tokenizer: {exc}") from None
        _save_converted(tokenizer, cached, replace_existing=damaged)
    return HFTokenizer(tokenizer, eos_token_ids(info))


def kvforge_cache_dir() -> Path:
    """$KVFORGE_CACHE_DIR, else $XDG_CACHE_HOME/kvforge, else ~/.cache/kvforge."""
    if os.environ.get("KVFORGE_CACHE_DIR"):
        return Path(os.environ["KVFORGE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvforge"


def _save_converted(tokenizer: Any, target: Path, replace_existing: bool = False) -> None:
    """Best effort: written to a temporary name and renamed, so a reader never sees half a
    copy; a read-only or full disk only costs the next load its conversion. A copy that
    another process published meanwhile is kept, unless ours replaces a damaged one."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=target.parent, prefix=".tmp-")
        tokenizer.save_pretrained(tmp)
        if replace_existing:
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # fails if a copy is there: then that one stays
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _config_eos_ids(directory: Path) -> tuple[int, ...]:
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        try:
            eos = json.loads((directory / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: the tokenizer's own EOS still applies
        ids += [eos] if isinstance(eos, int) else [i for i in eos or () if isinstance(i, int)]
    return tuple(ids)
