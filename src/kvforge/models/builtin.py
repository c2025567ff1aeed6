"""The built-in models.

`MINI_MODEL_DIR` (kvforge-mini, by name "kvforge-mini"): a small Llama
trained by `kvforge.training.train` on Python sources and retrieval documents, shipped
in the package as an HF checkpoint (docs/model-card.md).

`RANDOM_MODEL` ("random") is a small untrained Llama over UTF-8 bytes, built in
memory. Its weights are random but fixed (seeded), so its outputs are reproducible
and meaningless: it exercises the engine, not language (the tests use it).
"""

from pathlib import Path

import torch

from kvforge.config import ModelSpec
from kvforge.models.llama import LlamaForCausalLM, ModelConfig

MINI_MODEL_DIR = Path(__file__).parent / "kvforge-mini"
MINI_MODEL_NAME = "kvforge-mini"
RANDOM_MODEL = "random"  # model= / --model value for the untrained model below
BUILTIN_NAME = "kvforge-builtin-untrained"
NUM_BYTE_TOKENS = 256  # token i < 256 is the byte i
BOS_TOKEN_ID = 256
EOS_TOKEN_ID = 257
BOS_TEXT, EOS_TEXT = "<s>", "</s>"  # the special tokens' text, where it is shown
BUILTIN_SEED = 0
INIT_STD = 0.02  # transformers' initializer_range default

BUILTIN_CONFIG = ModelConfig(
    spec=ModelSpec(
        name=BUILTIN_NAME,
        architecture="llama",
        num_layers=4,
        num_attention_heads=8,
        num_kv_heads=2,
        head_dim=32,
        hidden_size=256,
        max_position_embeddings=4096,
        dtype="fp32",
        vocab_size=NUM_BYTE_TOKENS + 2,
        intermediate_size=688,
        tie_word_embeddings=False,
    ),
    architecture="LlamaForCausalLM",
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_ids=(EOS_TOKEN_ID,),
)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS (256) and EOS (257).

    Same interface as `tokenizer.HFTokenizer`: `encode` prepends BOS, `decode`
    skips special tokens and replaces invalid UTF-8 (a sampled byte sequence
    need not be valid).
    """

    bos_token_id = BOS_TOKEN_ID
    eos_token_ids = frozenset({EOS_TOKEN_ID})
    vocab_size = NUM_BYTE_TOKENS + 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [BOS_TOKEN_ID] * add_special_tokens + list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        run: list[int] = []  # bytes decoded together: a character may span tokens
        for i in [*ids, None]:
            if i is not None and 0 <= i < NUM_BYTE_TOKENS:
                run.append(i)
                continue
            parts.append(bytes(run).decode("utf-8", errors="replace"))
            run = []
            if i is not None and not skip_special_tokens:
                parts.append(self.token_text(i))
        return "".join(parts)

    def token_text(self, token_id: int) -> str:
        special = {BOS_TOKEN_ID: BOS_TEXT, EOS_TOKEN_ID: EOS_TEXT}
        if token_id in special:
            return special[token_id]
        return bytes([token_id]).decode("utf-8", errors="replace")

    def info(self) -> dict:
        return {"tokenizer_class": type(self).__name__, "bos_token": BOS_TEXT,
                "eos_token": EOS_TEXT, "pad_token": None, "unk_token": None,
                "chat_template": None, "add_bos_token": True}  # fmt: skip


def builtin_model(device: str | torch.device = "cpu") -> tuple[LlamaForCausalLM, ByteTokenizer]:
    """The built-in model (identical weights on every call) and its tokenizer."""
    # Built and initialised on the CPU with its own generator, so the weights do
    # not depend on the device or on anyone else's use of the global RNG.
    with torch.device("cpu"):
        model = LlamaForCausalLM(BUILTIN_CONFIG)
    generator = torch.Generator(device="cpu").manual_seed(BUILTIN_SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():  # registration order: deterministic
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, INIT_STD, generator=generator)
    model = model.to(device).eval().requires_grad_(False)
    return model, ByteTokenizer()
