"""CUDA paths (run with `pytest -m gpu` on a machine with a GPU)."""

import pytest

from kvforge import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_builtin_model_on_cuda_matches_cpu_greedy_and_samples_reproducibly():
    cpu = LLM(model="random", device="cpu", kv_memory="8MiB")
    gpu = LLM(model="random", device="cuda", kv_memory="8MiB")
    assert gpu.engine.store.k[0].device.type == "cuda"
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    assert gpu.generate(["The cat sat"], greedy)[0].token_ids == (
        cpu.generate(["The cat sat"], greedy)[0].token_ids
    )
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
    first = gpu.generate(["hello"], seeded)[0].token_ids
    assert gpu.generate(["x", "hello"], seeded)[1].token_ids == first
    gpu.engine.pool.check_integrity()
    assert gpu.kv_stats()["blocks_used"] == 0


def test_server_on_cuda_streams_and_frees_its_blocks():
    from test_server import GREEDY, MODEL, Server

    s = Server(LLM(model="random", device="cuda", kv_memory="8MiB"))
    try:
        chunks = list(
            s.client().completions.create(
                model=MODEL, prompt="The cat sat", max_tokens=8, stream=True, **GREEDY
            )
        )
        cpu = LLM(model="random", device="cpu", kv_memory="8MiB")
        expected = cpu.generate(["The cat sat"], SamplingParams(max_tokens=8, ignore_eos=True))
        assert "".join(c.choices[0].text for c in chunks) == expected[0].text
        s.wait_idle()
    finally:
        s.close()


def test_prefix_cache_and_tiers_on_cuda_keep_outputs(tmp_path):
    prompt = "The quick brown fox jumps over the lazy dog. " * 10
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    cpu = LLM(model="random", device="cpu", kv_memory="8MiB", enable_prefix_caching=False)
    expected = cpu.generate([prompt], params)[0].token_ids
    gpu = LLM(
        model="random",
        device="cuda",
        num_blocks=40,
        host_cache_memory="320KiB",
        disk_cache_dir=str(tmp_path),
    )
    assert gpu.generate([prompt], params)[0].token_ids == expected
    gpu.generate(["Completely different text to push blocks out. " * 12], params)
    again = gpu.generate([prompt], params)[0]
    assert again.token_ids == expected
    assert again.metrics.cached_tokens == 448 and again.metrics.cached_tokens_host > 0
    restarted = LLM(model="random", device="cuda", kv_memory="8MiB", disk_cache_dir=str(tmp_path))
    out = restarted.generate([prompt], params)[0]
    assert out.token_ids == expected and out.metrics.cached_tokens_disk == 448
    gpu.engine.pool.check_integrity()


def test_quantized_codecs_on_cuda():
    from kvforge.planner import bytes_per_token

    prompts = ["The quick brown fox jumps over the lazy dog. " * 6, "Hello"]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    full = LLM(model="random", device="cuda", kv_memory="8MiB").generate(prompts, params)
    for kv_dtype in ("int8", "fp8", "int4", "int2"):
        llm = LLM(model="random", device="cuda", kv_memory="8MiB", kv_dtype=kv_dtype)
        store = llm.engine.store
        assert store.k[0].parts["q"].device.type == "cuda"
        assert llm.kv_stats()["bytes_per_token"] == bytes_per_token(
            store.spec, store.format, store.block_size
        )
        outs = llm.generate(prompts, params)
        agree = sum(a == b for o, f in zip(outs, full, strict=True)
                    for a, b in zip(o.token_ids, f.token_ids, strict=True))  # fmt: skip
        assert agree >= 0.75 * 32, kv_dtype


def test_two_ranks_on_cuda_give_one_ranks_tokens():
    """Tensor parallelism on CUDA: with one GPU both ranks share it and their all-reduces go
    over gloo (through the host); with two or more each rank has its own and NCCL."""
    import torch

    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    with LLM(model="random", device="cuda", kv_memory="8MiB") as one:
        expected = one.generate(["The cat sat", "hello"], greedy)
    with LLM(model="random", device="cuda", kv_memory="8MiB", tensor_parallel_size=2) as two:
        group = two.engine.runner.group
        assert (group.comm.device_group is not None) == (torch.cuda.device_count() >= 2)
        got = two.generate(["The cat sat", "hello"], greedy)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        stats = two.kv_stats()
        assert stats["bytes_per_token_per_rank"] * 2 == one.kv_stats()["bytes_per_token"]
        assert stats["kv_bytes_allocated_by_rank"] == [stats["kv_bytes_allocated_per_rank"]] * 2
