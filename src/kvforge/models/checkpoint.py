"""Reading what a checkpoint holds without loading its weights.

A safetensors file starts with an 8-byte little-endian header length and a
JSON header mapping tensor names to dtype, shape and byte offsets. Reading
only that gives the exact parameter count and weight bytes of a checkpoint of
any size in milliseconds.
"""

import hashlib
import json
import struct
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

from kvforge.config import ModelSpec, load_hf_config, spec_from_hf_config
from kvforge.dtypes import normalize_dtype
from kvforge.errors import ConfigError
from kvforge.presets import PRESETS, find_preset, get_preset

SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    num_bytes: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Tensor names, dtypes, shapes and sizes of one file; ConfigError if it is not safetensors."""
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ConfigError(f"{path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise ConfigError(f"{path}: header length {header_len} is not a safetensors header")
            raw = f.read(header_len)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: safetensors header is not a JSON object")
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            itemsize = SAFETENSORS_DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: malformed header entry for tensor {name!r}") from None
        if end - begin != prod(shape) * itemsize:
            raise ConfigError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        tensors.append(TensorInfo(name, dtype, shape, end - begin))
    return tensors


@dataclass(frozen=True)
class CheckpointInfo:
    """Totals over every safetensors file of a checkpoint directory."""

    files: tuple[Path, ...]
    num_params: int
    num_bytes: int
    dtype: str | None  # the dtype holding the most parameters, in our short names


def scan_checkpoint(directory: Path) -> CheckpointInfo | None:
    """Parameter count and bytes from the headers; None when there are no safetensors files.

    Sharded checkpoints list their files in model.safetensors.index.json;
    otherwise every *.safetensors file in the directory counts. A tensor name
    seen twice is counted once.
    """
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = load_hf_config(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index}: no weight_map")
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ConfigError(f"{directory}: shards listed in the index are missing: {missing}")
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    seen: dict[str, TensorInfo] = {}
    for path in files:
        for tensor in read_safetensors_header(path):
            seen.setdefault(tensor.name, tensor)
    params_by_dtype: Counter[str] = Counter()
    for tensor in seen.values():
        params_by_dtype[tensor.dtype] += tensor.numel
    dtype = None
    if params_by_dtype:
        main_dtype = params_by_dtype.most_common(1)[0][0]
        try:
            dtype = normalize_dtype(main_dtype)
        except ConfigError:
            dtype = None  # e.g. packed U8 weights: bytes are exact, the dtype has no short name
    return CheckpointInfo(
        files=tuple(files),
        num_params=sum(params_by_dtype.values()),
        num_bytes=sum(t.num_bytes for t in seen.values()),
        dtype=dtype,
    )


FINGERPRINT_SAMPLES = 16  # regions of each weight file read for its fingerprint
FINGERPRINT_SAMPLE_BYTES = 64 * 1024


def model_fingerprint(path: Path, dtype: str) -> str:
    """A stable identity of a model's weights as served, for prefix-cache keys.

    `path` is a checkpoint directory or a GGUF file. Hashes config.json, each weight
    file's name, size and 16 evenly spaced 64 KiB samples of it (about 1 MiB a
    file, so it costs milliseconds, not a read of the whole model; the samples
    include the headers), plus the serving dtype. Two models with the same
    architecture but different weights differ in their sampled bytes; a K/V block
    computed from one is never served for the other.
    """
    h = hashlib.sha256(f"dtype:{dtype}".encode())
    if path.is_file():
        files = [path]
    else:
        config = path / "config.json"
        if config.is_file():
            h.update(config.read_bytes())
        files = sorted(path.glob("*.safetensors"))
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(size * i // FINGERPRINT_SAMPLES)
                h.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSource:
    """A `--model` argument resolved for planning: its spec, where it came from, and the
    weight files' exact figures when there are any (`file_type` names a GGUF's type)."""

    spec: ModelSpec
    kind: str  # "preset" | "config" | "checkpoint" | "gguf" | "builtin"
    checkpoint: CheckpointInfo | None = None
    file_type: str | None = None


def resolve_model(name_or_path: str | None) -> ModelSource:
    """Any `--model` value (`models.catalog`), a preset name, or a path to a config.json.

    GGUF files and checkpoint directories are read from their headers only. The
    default model (None, or its name) falls back to its preset when its package is
    not installed, since planning needs no weights.
    """
    from kvforge.models.builtin import BUILTIN_CONFIG, RANDOM_MODEL
    from kvforge.models.catalog import SMOLLM2_NAME, find_model
    from kvforge.models.gguf_file import is_gguf_file, read_gguf

    if name_or_path is None or name_or_path.strip().lower() == SMOLLM2_NAME:
        try:
            ref = find_model(None)
        except ConfigError:  # not installed: its published config is enough to plan
            return ModelSource(get_preset(SMOLLM2_NAME), "preset")
    elif name_or_path == RANDOM_MODEL:
        return ModelSource(BUILTIN_CONFIG.spec, "builtin")
    else:
        path = Path(name_or_path).expanduser()
        config_file = path.is_file() and not is_gguf_file(path) and path.suffix != ".gguf"
        if path.suffix == ".json" or config_file or find_preset(name_or_path) is not None:
            return _config_or_preset(name_or_path, path)
        try:
            ref = find_model(name_or_path)
        except ConfigError:
            return _config_or_preset(name_or_path, path)
    if ref.kind == "gguf":
        info = read_gguf(ref.path)
        spec = spec_from_hf_config(info.config, ref.name, str(ref.path))
        checkpoint = CheckpointInfo((ref.path,), info.num_params, info.num_bytes, None)
        return ModelSource(spec, "gguf", checkpoint, info.file_type)
    config_path = ref.path / "config.json"
    if not config_path.exists():
        raise ConfigError(f"{ref.path}: a checkpoint directory needs a config.json")
    spec = spec_from_hf_config(load_hf_config(config_path), ref.path.name, str(config_path))
    return ModelSource(spec, "checkpoint", scan_checkpoint(ref.path))


def _config_or_preset(name: str, path: Path) -> ModelSource:
    if path.is_file():
        spec = spec_from_hf_config(load_hf_config(path), path.parent.name or path.stem, str(path))
        return ModelSource(spec, "config")
    spec = find_preset(name)
    if spec is None and (path.suffix == ".json" or "/" in name):
        raise ConfigError(f"{name}: no such GGUF file, config file or checkpoint directory")
    if spec is None:
        from kvforge.models.catalog import MODEL_NAMES

        raise ConfigError(
            f"unknown model {name!r}: not a GGUF file, a config.json, a checkpoint directory "
            f"or one of {', '.join(MODEL_NAMES)}; presets: {', '.join(PRESETS)}"
        )
    return ModelSource(spec, "preset")
