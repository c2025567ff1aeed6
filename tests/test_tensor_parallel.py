"""Tensor parallelism on the CPU over gloo: the ranks kvforge starts (or torchrun does)
give one rank's greedy tokens, each rank holds the KV bytes the planner predicts for its
heads, every KV codec and cache feature works at TP=2, and a rank that dies fails the
engine with a clear error, every process reaped."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from kvforge import LLM, SamplingParams
from kvforge.errors import EngineDeadError, KVForgeError
from kvforge.kvcache.policy import make_policy
from kvforge.models import catalog
from kvforge.planner import plan_kv, tensor_parallel_sizes
from process_util import free_port, served
from test_models import hf_model

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [
    [(7 * i + 3) % 120 for i in range(20)],
    [(11 * i + 5) % 120 for i in range(13)],
    [(5 * i + 1) % 120 for i in range(37)],
]
# HF architectures, random weights (biases and norms too: see test_models.hf_model)
MODELS = {
    "llama-gqa": {},  # 4 query / 2 KV heads: one KV head a rank
    "mistral-mqa-window": {},  # 1 KV head: each rank stores it (replicated); window 8
    "qwen2": {},  # q/k/v biases, cut with their rows
    "llama-bias": {},  # o_proj's bias: added once, by rank 0, before the all-reduce
    "qwen3": {},  # RMSNorm over each head of q and k
    "llama-tied": {"vocab_size": 125},  # a tied LM head over a vocabulary 2 does not divide
}
KV_MEMORY = 2**20


def _greedy(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


def _check_rank_bytes(llm: LLM, ranks: int, one_rank_bytes_per_token: int) -> None:
    """kv_stats against the planner, and each rank's store as it allocated it."""
    spec = llm.engine.runner.model.config.spec
    stats = llm.kv_stats()
    plan = plan_kv(spec, kv_memory_bytes=KV_MEMORY, block_size=stats["block_size"],
                   kv_dtype=llm.engine.store.format.name,
                   tensor_parallel_size=ranks)  # fmt: skip
    assert stats["tensor_parallel_size"] == ranks
    assert stats["bytes_per_token_per_rank"] == plan.bytes_per_token_per_rank
    assert stats["bytes_per_token"] == plan.bytes_per_token == ranks * plan.bytes_per_token_per_rank
    assert stats["blocks_total"] == plan.kv_capacity_blocks
    rank_bytes = plan.bytes_per_block_per_rank * plan.kv_capacity_blocks
    assert stats["kv_bytes_allocated_by_rank"] == [rank_bytes] * ranks
    if spec.num_kv_heads % ranks == 0:  # the heads divide: each rank holds its share
        assert stats["bytes_per_token_per_rank"] * ranks == one_rank_bytes_per_token
    else:  # fewer KV heads than ranks: each rank stores the one its query heads read
        assert stats["bytes_per_token_per_rank"] == one_rank_bytes_per_token


@pytest.fixture(scope="module", params=list(MODELS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model(request.param, **MODELS[request.param]).save_pretrained(path)
    return path


def test_two_ranks_give_one_ranks_tokens_and_the_planners_bytes(checkpoint):
    with LLM(model=str(checkpoint), kv_memory=KV_MEMORY) as one:
        expected = _greedy(one)
        one_bytes = one.kv_stats()["bytes_per_token"]
    with LLM(model=str(checkpoint), kv_memory=KV_MEMORY, tensor_parallel_size=2) as two:
        assert _greedy(two) == expected
        # again, each prompt alone: the batch did not decide the tokens
        assert [_greedy(two, [p])[0] for p in PROMPTS] == expected
        _check_rank_bytes(two, 2, one_bytes)
        process = two.engine.runner.group.processes[0]
    assert process.poll() == 0  # rank 1 was told to stop, and exited


@pytest.mark.slow
def test_smollm2_at_three_ranks_gives_one_ranks_tokens():
    """9 query / 3 KV heads and an intermediate size of 1536: 1 and 3 ranks split it (2
    does not divide 9 query heads; 9 does not divide 1536). Its Q4_1 weights are cut at
    whole groups of 32: o_proj's 576 inputs are 192 a rank, down_proj's 1536 are 512."""
    path = str(catalog.smollm2_path())
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=16, temperature=0)
    with LLM(model=path, kv_memory="64MiB") as one:
        expected = _greedy(one, prompts, params)
        spec = one.engine.runner.model.config.spec
        one_bytes = one.kv_stats()["bytes_per_token"]
    assert tensor_parallel_sizes(spec) == [1, 3]
    with LLM(model=path, kv_memory="64MiB", tensor_parallel_size=3) as three:
        assert _greedy(three, prompts, params) == expected
        stats = three.kv_stats()
        assert stats["bytes_per_token_per_rank"] == 15_360 == one_bytes // 3
        assert stats["kv_bytes_allocated_by_rank"] == [stats["kv_bytes_allocated_per_rank"]] * 3
    with pytest.raises(KVForgeError) as refused:
        LLM(model=path, tensor_parallel_size=2)
    assert str(refused.value) == (
        "tensor_parallel_size 2 cannot split SmolLM2-135M-Instruct.Q4_1.gguf: its 9 query "
        "heads do not divide by 2; sizes that work: 1, 3"
    )


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_weights_are_cut_at_whole_groups(tmp_path, weights):
    """Each shard of a quantized matmul is a whole number of groups of 32: down_proj's
    128 inputs are 64 a rank. With 96 (48 a rank) the cut is refused by name."""
    hf_model("llama-gqa", intermediate_size=128).save_pretrained(tmp_path / "even")
    with LLM(model=str(tmp_path / "even"), weights_dtype=weights, kv_memory=KV_MEMORY) as one:
        expected = _greedy(one)
    with LLM(model=str(tmp_path / "even"), weights_dtype=weights, kv_memory=KV_MEMORY,
             tensor_parallel_size=2) as two:  # fmt: skip
        assert _greedy(two) == expected
        down = two.engine.runner.model.model.layers[0].mlp.down_proj.inner
        assert down.qweight.shape == (64, 64)  # [hidden, its 64 of the 128 inputs]
    hf_model("llama-gqa").save_pretrained(tmp_path / "odd")  # intermediate_size 96
    with pytest.raises(KVForgeError) as refused:
        LLM(model=str(tmp_path / "odd"), weights_dtype=weights, tensor_parallel_size=2)
    assert str(refused.value) == (
        "a shard of input columns 0:48 splits a quantization group of 32: tensor "
        "parallelism needs shards of whole groups"
    )


# --- every KV codec with each cache feature, at two ranks ---------------------------------

CODECS = ["fp32", "fp16", "bf16", "fp8", "int8", "int4", "int2"]
FEATURES = ["prefix", "policy", "swap", pytest.param("server", marks=pytest.mark.slow)]
SHARED = list(range(1, 70))  # a prefix two requests share (whole blocks at 16 and 64)
_engines: dict[tuple[str, int], LLM] = {}


def _engine(codec: str, ranks: int) -> LLM:
    """One engine per codec and rank count, shared by the features' tests (one
    tensor-parallel engine at a time: a process has one torch.distributed group): a pool
    small enough that three long requests preempt one another (swapped out and back)."""
    key = (codec, ranks)
    if key not in _engines:
        if ranks > 1:
            _close_parallel()
        window = LLM(model="random", kv_dtype=codec, num_blocks=64).kv_stats()
        blocks = 2 * window["window_blocks_per_request"] + (4 if window["block_size"] == 64 else 24)
        _engines[key] = LLM(model="random", kv_dtype=codec, num_blocks=blocks,
                            preemption_mode="swap", max_num_batched_tokens=256,
                            tensor_parallel_size=ranks)  # fmt: skip
    return _engines[key]


def _close_parallel() -> None:
    for key in [k for k in _engines if k[1] > 1]:
        _engines.pop(key).close()


@pytest.fixture(autouse=True)
def _one_group_at_a_time(request):
    """Other tests start their own group: the matrix's engine at two ranks goes first."""
    if request.node.originalname != "test_every_codec_and_feature_at_two_ranks":
        _close_parallel()
    yield


@pytest.fixture(scope="module", autouse=True)
def _close_engines():
    yield
    for llm in _engines.values():
        llm.close()
    _engines.clear()


def _prefix(llm: LLM) -> tuple:
    first = llm.generate([[*SHARED, 200, 201]], GREEDY)[0]
    second = llm.generate([[*SHARED, 202, 203, 204]], GREEDY)[0]
    return first.token_ids, second.token_ids, second.metrics.cached_tokens


def _policy(llm: LLM) -> tuple:
    """streaming (sinks re-rotated as they move) and h2o (attention scores gathered over
    every rank's heads) on a prompt past their budgets, at once. int4 and int2 keep whole
    blocks of 64 and their 32 newest tokens exact: their budget holds three blocks."""
    engine = llm.engine
    windowed = engine.store.block_size == 64
    budget = 192 if windowed else 96
    prompt = [(3 * i + 7) % 250 for i in range(300 if windowed else 150)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    out = []
    for name in ("streaming", "h2o"):
        engine.add_request(prompt, params, request_id=f"{name}-{id(llm)}",
                           kv_policy=make_policy(name, budget))  # fmt: skip
    while engine.has_unfinished:
        for event in engine.step():
            if event.finished:
                out.append((event.request.request_id.split("-")[0], event.request.output_token_ids))
    return tuple(sorted(out))


def _swap(llm: LLM) -> tuple:
    prompts = [[(13 * i + k) % 250 for i in range(120)] for k in range(3)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    before = llm.engine.manager.num_preemptions
    tokens = _greedy(llm, prompts, params)
    return tokens, llm.engine.manager.num_preemptions > before


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_and_feature_at_two_ranks(codec, feature):
    one, two = _engine(codec, 1), _engine(codec, 2)
    if feature == "prefix":
        expected, got = _prefix(one), _prefix(two)
        assert got == expected
        assert got[2] == (len(SHARED) // two.engine.store.block_size) * two.engine.store.block_size
    elif feature == "policy":
        assert _policy(two) == _policy(one)
    elif feature == "swap":
        expected, got = _swap(one), _swap(two)
        assert got == expected
        assert got[1], "the pool was meant to preempt"
    else:
        _serve_and_compare(codec)
    two.engine.pool.check_integrity()
    assert two.kv_stats()["blocks_used"] == 0


def _serve_and_compare(codec: str) -> None:
    """`kvforge serve --tensor-parallel-size 2` answers the openai client with the tokens
    one rank gives offline."""
    prompt = [(5 * i + 2) % 250 for i in range(40)]
    expected = _greedy(_engine(codec, 1), [prompt])[0]
    with served("--model", "random", "--kv-dtype", codec, "--kv-memory", "4MiB",
                "--tensor-parallel-size", "2") as (_, url):  # fmt: skip
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}
        out = client.completions.create(model=model, prompt=prompt, max_tokens=10,
                                        temperature=0, logprobs=0, extra_body=extra)  # fmt: skip
        ids = [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]
        assert ids == expected


# --- the tiers: a block's bytes are every rank's share ------------------------------------

FOX = "The quick brown fox jumps over the lazy dog. " * 10  # 451 tokens: 28 full blocks
OTHER = "Completely different text to push blocks out. " * 12
RANK_BLOCK_BYTES = 1024 * 16  # the built-in model at two ranks: 1,024 B a token a rank


def test_host_and_disk_tiers_hold_every_ranks_share(tmp_path):
    options = dict(model="random", num_blocks=40, disk_cache_dir=str(tmp_path))
    with LLM(**options, host_cache_memory=10 * 2 * RANK_BLOCK_BYTES) as one:
        expected = _greedy(one, [FOX])[0]
    tp_dir = tmp_path / "tp2"
    options["disk_cache_dir"] = str(tp_dir)
    with LLM(**options, host_cache_memory=10 * 2 * RANK_BLOCK_BYTES, tensor_parallel_size=2) as two:
        assert _greedy(two, [FOX])[0] == expected
        two.generate([OTHER], GREEDY)  # FOX's blocks leave the device: host, then disk
        stats = two.kv_stats()
        assert stats["host_blocks"] == 10 and stats["host_evictions"] > 0
        again = two.generate([FOX], GREEDY)[0]
        assert again.token_ids == expected
        m = again.metrics
        assert m.cached_tokens == 448 and m.cached_tokens_host > 0 and m.cached_tokens_disk > 0
    files = sorted(tp_dir.glob("*.kvblock"))
    # each file: both ranks' shares of a block (2 x 16 tokens x 1,024 B) and its header
    assert len(files) >= 28 and all(f.stat().st_size > 2 * RANK_BLOCK_BYTES for f in files)
    with LLM(**options, tensor_parallel_size=2) as fresh:  # a new group, the same disk
        out = fresh.generate([FOX], GREEDY)[0]
        assert out.token_ids == expected
        assert out.metrics.cached_tokens == out.metrics.cached_tokens_disk == 448
    with LLM(**options) as single:  # one rank's blocks are laid out otherwise: other keys
        assert single.generate([FOX], GREEDY)[0].metrics.cached_tokens_disk == 0


# --- failures -----------------------------------------------------------------------------


def test_a_rank_that_dies_fails_the_engine_cleanly():
    llm = LLM(model="random", tensor_parallel_size=2)
    assert _greedy(llm, PROMPTS[:1])  # running
    group = llm.engine.runner.group
    os.kill(group.processes[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError) as died:
        llm.generate(PROMPTS[:1], GREEDY)
    assert time.monotonic() - start < 30  # no hang on the dead rank
    message = str(died.value)
    assert message == "tensor-parallel rank 1 exited with code -9; the engine cannot continue"
    assert group.processes[0].poll() == -9  # reaped
    with pytest.raises(EngineDeadError, match="rank 1 exited with code -9"):
        llm.generate(PROMPTS[:1], GREEDY)  # and every later call says so at once
    llm.close()


def test_a_served_rank_that_dies_ends_requests_with_an_error_and_the_server():
    with served("--model", "random", "--tensor-parallel-size", "2") as (proc, url):
        body = {"model": "kvforge-builtin-untrained", "prompt": "hello", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        ranks = [pid for pid in _descendants(proc.pid)
                 if b"kvforge.engine.parallel" in _cmdline(pid)]  # fmt: skip
        assert len(ranks) == 1
        os.kill(int(ranks[0]), signal.SIGKILL)
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 500
        error = reply.json()["error"]
        assert "tensor-parallel rank 1 exited with code -9" in error["message"]
        assert proc.wait(timeout=30) == 1  # the server stops with its engine
        assert "the engine stopped: tensor-parallel rank 1 exited" in proc.stdout.read()


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (the server's engine process, and the ranks it started)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                              text=True).stdout.split()  # fmt: skip
    return [d for c in map(int, children) for d in (c, *_descendants(c))]


def test_bad_sizes_are_refused_by_name(capsys):
    from kvforge.cli import main

    with pytest.raises(KVForgeError, match="tensor_parallel_size must be a positive integer"):
        LLM(model="random", tensor_parallel_size=0)
    with pytest.raises(KVForgeError) as refused:
        LLM(model="random", tensor_parallel_size=3)
    assert str(refused.value) == (
        "tensor_parallel_size 3 cannot split kvforge-builtin-untrained: its 8 query heads "
        "do not divide by 3; sizes that work: 1, 2, 4, 8"
    )
    assert main(["generate", "--model", "random", "--prompt", "hi",
                 "--tensor-parallel-size", "3"]) == 2  # fmt: skip
    assert "sizes that work: 1, 2, 4, 8" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_ranks_run_the_same_command():
    """`torchrun --nproc-per-node 2 -m kvforge generate ... --tensor-parallel-size 2`: rank
    0 is the engine, rank 1 serves it; the tokens are one rank's."""
    prompt = "tensor parallel ranks"
    with LLM(model="random") as one:
        expected = _greedy(one, [prompt])[0]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "kvforge", "generate",
               "--model", "random", "--tensor-parallel-size", "2", "--max-tokens", "10",
               "--ignore-eos", "--json", "--prompt", prompt]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == expected
