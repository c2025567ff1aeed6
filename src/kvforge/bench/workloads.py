"""Benchmark models and workloads, defined in code and seeded so anyone can rerun them.

No model can be downloaded here, so the default benchmark model is a
random-init Llama written to disk once with transformers' `save_pretrained`:
every engine (kvforge, transformers, llama.cpp via GGUF) loads the same weights.
"""

import random
from dataclasses import dataclass
from pathlib import Path

# Llama, hidden 512, 8 layers, 8 heads, 2 KV heads, vocab 32,000 (~41M parameters)
SMALL_LLAMA = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 1536,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
# the same shape at a size where bandwidth and FLOP floors are meaningful (~300M parameters)
MEDIUM_LLAMA = {
    **SMALL_LLAMA,
    "hidden_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "intermediate_size": 4096,
}
# smoke size for --quick
TINY_LLAMA = {
    **SMALL_LLAMA,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "vocab_size": 1000,
}


def random_checkpoint(config: dict, directory: Path, seed: int = 0) -> Path:
    """Write a random-init float32 LlamaForCausalLM to `directory` once; reuse it after."""
    import torch
    import transformers

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    model.save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


def mixed_workload(
    num_requests: int,
    vocab_size: int,
    prompt_range: tuple[int, int] = (32, 256),
    output_range: tuple[int, int] = (16, 64),
    seed: int = 0,
) -> list[Request]:
    """Prompt and output lengths uniform in their ranges (inclusive), token ids uniform."""
    rng = random.Random(seed)
    return [
        Request(
            [rng.randrange(3, vocab_size) for _ in range(rng.randint(*prompt_range))],
            rng.randint(*output_range),
        )
        for _ in range(num_requests)
    ]
