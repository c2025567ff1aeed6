"""Tokenizers: a checkpoint's (transformers) or a GGUF file's (converted by transformers
once, the copy kept in kvforge's cache), behind the engine's small `Tokenizer` interface."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

from kvforge.errors import ConfigError
from kvforge.models.gguf_file import GGUFModel, as_gguf, eos_token_ids

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (`ByteTokenizer` and `HFTokenizer` have it)."""

    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def token_text(self, token_id: int) -> str: ...  # one token's text, special ones too

    def info(self) -> dict: ...  # its special tokens and chat template, by name


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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special tokens written in the text (`<|im_start|>`) are parsed as
        such, and `add_special_tokens` adds the tokenizer's own (BOS for Llama)."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def info(self) -> dict:
        t = self._tokenizer
        return {
            "tokenizer_class": type(t).__name__,
            "bos_token": t.bos_token,
            "eos_token": t.eos_token,
            "pad_token": t.pad_token,
            "unk_token": t.unk_token,
            "chat_template": getattr(t, "chat_template", None),
            "add_bos_token": getattr(t, "add_bos_token", None),
        }


def load_tokenizer(path: str | Path | GGUFModel) -> HFTokenizer:
    """The tokenizer saved in a checkpoint directory or a GGUF file; ConfigError if none.

    A GGUF file's vocabulary, merges, special tokens, BOS handling and chat template
    are in its metadata; transformers converts them to a fast tokenizer.
    """
    info = as_gguf(path)
    if info is not None:
        return _load_gguf_tokenizer(info)
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
