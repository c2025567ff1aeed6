"""The engine against transformers: same tokens, alone or batched, chunked, preempted.

Random-init tiny models of every supported architecture (float32, CPU) are
saved with save_pretrained and loaded by kvforge from disk.
"""

import pytest
import torch
import transformers

from kvforge import LLM, SamplingParams
from kvforge.planner import bytes_per_token

TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 211,
    "max_position_embeddings": 512,
}
ARCHITECTURES = {
    "llama": ("llama", {}),
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "llama-tied-mha": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "mistral-mqa-window": ("mistral", {"num_key_value_heads": 1, "sliding_window": 24}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
}
PROMPTS = [
    [5, 17, 42, 9, 100, 3, 77],
    list(range(20, 61)),
    [150, 151, 152],
    [int(x) for x in torch.randint(0, 211, (19,), generator=torch.Generator().manual_seed(1))],
]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    model_type, extra = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def recompute_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """No cache: the whole sequence goes through the model for every new token."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([tokens]), use_cache=False).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


GREEDY_32 = SamplingParams(max_tokens=32, ignore_eos=True)


def run(llm: LLM, prompts, params=GREEDY_32) -> list[list[int]]:
    outs = llm.generate(prompts, params)
    llm.engine.pool.check_integrity()
    assert llm.kv_stats()["blocks_free"] == llm.kv_stats()["blocks_total"]
    return [o.token_ids for o in outs]


def test_greedy_equals_transformers_generate_and_recompute(checkpoint):
    path, model = checkpoint
    llm = LLM(model=str(path), device="cpu", num_blocks=64)
    for prompt in PROMPTS[:2]:
        ours = run(llm, [prompt])[0]
        assert len(ours) == 32
        assert ours == hf_greedy(model, prompt, 32)
        assert ours == recompute_greedy(model, prompt, 32)


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_batched_equals_alone(checkpoint, block_size):
    path, model = checkpoint
    llm = LLM(model=str(path), device="cpu", block_size=block_size, kv_memory="4MiB")
    alone = [run(llm, [p])[0] for p in PROMPTS]
    assert run(llm, PROMPTS) == alone
    assert alone[2] == hf_greedy(model, PROMPTS[2], 32)


def test_small_prefill_chunks_equal_alone(checkpoint):
    path, _ = checkpoint
    reference = run(LLM(model=str(path), device="cpu", num_blocks=64), PROMPTS)
    chunked = LLM(
        model=str(path), device="cpu", num_blocks=64, max_num_batched_tokens=5, max_num_seqs=4
    )
    assert run(chunked, PROMPTS) == reference


def test_preemption_keeps_outputs_identical(checkpoint):
    path, _ = checkpoint
    reference = run(LLM(model=str(path), device="cpu", num_blocks=64), PROMPTS)
    # 4 requests need 3+5+3+4 = 15 blocks of 16 at the end; 8 blocks force preemption
    small = LLM(model=str(path), device="cpu", num_blocks=8)
    assert run(small, PROMPTS) == reference
    assert small.kv_stats()["num_preemptions"] > 0


def test_store_bytes_per_token_equal_the_planner(checkpoint):
    path, _ = checkpoint
    for kv_dtype in ("fp32", "fp16", "bf16"):
        llm = LLM(model=str(path), device="cpu", num_blocks=10, kv_dtype=kv_dtype)
        store = llm.engine.store
        spec = llm.engine.store.spec
        assert store.bytes_per_token == bytes_per_token(spec, store.format, 16)
        assert llm.kv_stats()["kv_bytes_allocated"] == 10 * 16 * store.bytes_per_token


def test_half_precision_engine_runs_and_halves_the_cache(checkpoint):
    path, _ = checkpoint
    fp32 = LLM(model=str(path), device="cpu", num_blocks=16)
    bf16 = LLM(model=str(path), device="cpu", num_blocks=16, dtype="bf16")
    assert bf16.kv_stats()["bytes_per_token"] * 2 == fp32.kv_stats()["bytes_per_token"]
    outs = run(bf16, PROMPTS[:2], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [len(o) for o in outs] == [8, 8]
    assert all(0 <= t < TINY["vocab_size"] for o in outs for t in o)
