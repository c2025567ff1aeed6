"""The LLM API on the built-in model: sampling, stops, limits, streaming, KV stats."""

import json
import subprocess
import sys

import pytest

from kvforge import LLM, RequestOutput, SamplingParams
from kvforge.errors import KVForgeError


@pytest.fixture(scope="module")
def llm():
    return LLM(model="random", device="cpu", kv_memory="8MiB")


def assert_pool_whole(llm):
    llm.engine.pool.check_integrity()
    stats = llm.kv_stats()
    assert stats["blocks_free"] == stats["blocks_total"] and stats["blocks_used"] == 0


def test_outputs_and_metrics(llm):
    out = llm.generate(["The cat sat"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert isinstance(out, RequestOutput)
    assert out.prompt_token_ids == [256, *b"The cat sat"]  # BOS + bytes
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    m = out.metrics
    assert (m.prompt_tokens, m.completion_tokens, m.cached_tokens) == (12, 8, 0)
    assert m.ttft_s > 0 and m.tpot_s > 0
    assert_pool_whole(llm)


def test_kv_stats_fields(llm):
    stats = llm.kv_stats()
    # built-in model: 4 layers × 2 KV heads × 32 head_dim × 2 (K, V) × 4 B (fp32)
    assert stats["bytes_per_token"] == 4 * 2 * 32 * 2 * 4 == 2048
    assert stats["kv_bytes_allocated"] == 8 * 2**20
    assert stats["blocks_total"] == 8 * 2**20 // (16 * 2048)
    assert set(stats) >= {
        "block_size", "blocks_total", "blocks_free", "blocks_used", "bytes_per_token",
        "kv_bytes_allocated", "tokens_stored", "waste_ratio",
    }  # fmt: skip


def test_kv_stats_while_running(llm):
    engine = llm.engine
    engine.add_request([256, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
                       SamplingParams(max_tokens=3, ignore_eos=True))  # fmt: skip
    engine.step()  # prefill of 18 tokens + first sample
    stats = llm.kv_stats()
    assert (stats["blocks_used"], stats["tokens_stored"]) == (2, 18)
    assert stats["waste_ratio"] == pytest.approx(1 - 18 / 32)
    while engine.has_unfinished:
        engine.step()
    assert_pool_whole(llm)


def test_same_seed_same_tokens_alone_or_batched(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7,
                            ignore_eos=True)  # fmt: skip
    alone = llm.generate(["hello"], params)[0].token_ids
    batched = llm.generate(["other prompt", "hello", "x"], params)[1].token_ids
    assert alone == batched
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True)
    assert llm.generate(["hello"], other_seed)[0].token_ids != alone


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(["abc"], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    top1 = llm.generate(["abc"], SamplingParams(max_tokens=10, temperature=0.7, top_k=1,
                                                 seed=3, ignore_eos=True))[0]  # fmt: skip
    assert top1.token_ids == greedy.token_ids


def test_stop_token_ids_and_stop_strings(llm):
    free = llm.generate(["abc"], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = llm.generate(["abc"], SamplingParams(max_tokens=20, stop_token_ids=[stop_id],
                                                ignore_eos=True))[0]  # fmt: skip
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: first + 1]
    # a stop string: text cut before it
    text = free.text
    stop = text[3:5] if len(text) >= 5 else text[-1]
    cut = llm.generate(["abc"], SamplingParams(max_tokens=20, stop=stop, ignore_eos=True))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.find(stop)]
    assert_pool_whole(llm)


def test_eos_stops_unless_ignored(llm):
    eos = 257
    free = llm.generate(["abc"], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert llm.engine.tokenizer.eos_token_ids == frozenset({eos})
    params = SamplingParams(max_tokens=20, stop_token_ids=[free.token_ids[0]])
    out = llm.generate(["abc"], params)[0]
    assert out.token_ids == free.token_ids[:1] and out.text == ""


def test_too_long_requests_are_refused_while_others_run(llm):
    ok = SamplingParams(max_tokens=4, ignore_eos=True)
    outs = llm.generate(["fine", "x" * 5000, "also fine"], ok)
    assert [o.finish_reason for o in outs] == ["length", "abort", "length"]
    assert "exceeds the model's context of 4096 tokens" in outs[1].error
    assert_pool_whole(llm)
    small = LLM(model="random", device="cpu", num_blocks=100)
    big = SamplingParams(max_tokens=4000, ignore_eos=True)
    outs = small.generate(["fine", "y"], [ok, big])
    assert outs[0].finish_reason == "length"
    assert outs[1].error == (
        "prompt (2 tokens) + max_tokens (4000) needs 251 KV blocks of 16 tokens; the pool has "
        "100 (1600 tokens): raise kv_memory or num_blocks"
    )
    assert_pool_whole(small)


def test_bad_sampling_params_name_the_limit():
    with pytest.raises(KVForgeError, match="max_tokens must be at least 1, got 0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(KVForgeError, match="temperature must be a finite number >= 0, got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(KVForgeError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(KVForgeError, match="top_k must be a non-negative integer"):
        SamplingParams(top_k=-1)


def test_bad_engine_options():
    with pytest.raises(KVForgeError, match="kv_memory 100 B holds no KV block"):
        LLM(model="random", device="cpu", kv_memory=100)
    with pytest.raises(KVForgeError, match="num_blocks must be a positive integer"):
        LLM(model="random", device="cpu", num_blocks=0)
    with pytest.raises(KVForgeError, match="unknown KV dtype 'int3'; choose one of: auto"):
        LLM(model="random", device="cpu", num_blocks=4, kv_dtype="int3")
    with pytest.raises(KVForgeError, match="block_size must be a positive integer, got 0"):
        LLM(model="random", device="cpu", num_blocks=4, block_size=0)


def test_token_id_prompts_and_vocabulary_check(llm):
    out = llm.generate([[256, 72, 105]], SamplingParams(max_tokens=2, ignore_eos=True))[0]
    assert out.prompt_token_ids == [256, 72, 105] and len(out.token_ids) == 2
    bad = llm.generate([[256, 9999]], SamplingParams(max_tokens=2))[0]
    assert bad.finish_reason == "abort" and "outside the vocabulary [0, 258)" in bad.error


def test_stream_yields_tokens_as_they_come(llm):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    events = list(llm.stream(["ab", "cd"], params))
    for index in (0, 1):
        mine = [e for e in events if e.index == index]
        assert len(mine) == 6
        final = mine[-1].output
        assert final.finish_reason == "length"
        assert [e.token_id for e in mine] == final.token_ids
        assert "".join(e.text for e in mine) == final.text
    assert final.token_ids == llm.generate(["cd"], params)[0].token_ids
    assert_pool_whole(llm)


def test_stream_abandoned_early_frees_blocks(llm):
    stream = llm.stream(["abcdef"], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    assert llm.kv_stats()["blocks_used"] == 1
    stream.close()
    assert_pool_whole(llm)


def test_generate_cli_runs_the_shipped_trained_model_by_name():
    result = subprocess.run(
        [sys.executable, "-m", "kvforge", "generate", "--model", "kvforge-mini", "--prompt",
         "The cat sat", "--max-tokens", "16", "--json", "--ignore-eos"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == "kvforge-mini"
    assert len(data["token_ids"]) == 16 and data["finish_reason"] == "length"
    llm = LLM(model="kvforge-mini", device="cpu", kv_memory="8MiB")
    prompt_tokens = len(llm.engine.tokenizer.encode("The cat sat"))
    assert data["metrics"]["prompt_tokens"] == prompt_tokens
    assert data["kv_peak"]["blocks_used"] == -(-(prompt_tokens + 16) // 16)
    expected = llm.generate(["The cat sat"], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert data["token_ids"] == expected.token_ids


def test_generate_cli_streams_and_refuses_bad_input():
    result = subprocess.run(
        [sys.executable, "-m", "kvforge", "generate", "--model", "random", "--prompt", "hi",
         "--max-tokens", "4"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stderr and "TTFT" in result.stderr
    too_long = subprocess.run(
        [sys.executable, "-m", "kvforge", "generate", "--model", "random", "--prompt", "x" * 5000],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert too_long.returncode == 2
    assert "kvforge generate: error: prompt (5001 tokens) + max_tokens (64)" in too_long.stderr
    assert "Traceback" not in too_long.stderr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0, got inf"),
        ({"seed": 2**64}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_non_finite_and_out_of_range_sampling_params(kwargs, message):
    with pytest.raises(KVForgeError, match=message):
        SamplingParams(**kwargs)


def test_top_k_and_top_p_keep_exactly_the_best_on_ties():
    import torch

    from kvforge.engine.sampling import _filter_top_k_top_p

    logits = torch.tensor([1.0, 3.0, 3.0, 0.0])
    kept = _filter_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [False, True, True, False]
    nucleus = _filter_top_k_top_p(logits, top_k=0, top_p=1e-6)
    assert torch.isfinite(nucleus).tolist() == [False, True, False, False]  # first of the tie
    assert SamplingParams(temperature=0.9, top_k=1).greedy
    assert SamplingParams(temperature=1e-7).greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
        ({"frequency_penalty": float("nan")}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be in \(0, inf\), got 0"),
        ({"repetition_penalty": float("inf")}, r"repetition_penalty must be in \(0, inf\)"),
        ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens \(5\) must not exceed max_tokens"),
        ({"logit_bias": {3: 101.0}}, r"logit_bias\[3\] must be in \[-100, 100\]"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids, got -1"),
        ({"logprobs": -1}, "logprobs must be an integer >= 0, got -1"),
        ({"max_tokens": 0}, r"0 only scores the prompt: with prompt_logprobs"),
    ],
)
def test_penalty_and_logprob_params_name_their_range(kwargs, message):
    with pytest.raises(KVForgeError, match=message):
        SamplingParams(**kwargs)


def test_extreme_values_still_sample_a_token(llm):
    """What a fuzz of the server found: a tiny repetition_penalty overflowed the logits
    to inf, and a top_p below float32's least number dropped every token (both: NaN
    probabilities). The order of the logits is kept; the best token always stays."""
    import torch

    from kvforge.engine.sampling import History, process_logits

    row = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = process_logits(
        row, SamplingParams(repetition_penalty=1e-300), History([0, 1], [], frozenset())
    )
    assert torch.isfinite(out[[0, 2, 3]]).all() and out.argmax() == 0
    big = process_logits(row, SamplingParams(repetition_penalty=3.4e38, min_tokens=1),
                         History([0, 1], [], frozenset({3})))  # fmt: skip
    assert torch.isfinite(big[:3]).all() and big[3] == float("-inf")  # 3 stays masked
    greedy = llm.generate(["0"], SamplingParams(max_tokens=3))[0].token_ids
    tiny_top_p = SamplingParams(max_tokens=3, temperature=1.0, top_p=5e-324, seed=1)
    tiny_penalty = SamplingParams(max_tokens=3, temperature=1e-4, repetition_penalty=1e-300)
    huge = SamplingParams(max_tokens=3, temperature=8e307, repetition_penalty=3.4e38, seed=3)
    held = SamplingParams(max_tokens=3, temperature=1.0, repetition_penalty=3.4e38, min_tokens=3,
                          stop_token_ids=list(range(1, 258)), seed=5)  # fmt: skip
    for params in (tiny_top_p, tiny_penalty, huge, held):
        out = llm.generate(["0"], params)[0]
        assert out.error is None and len(out.token_ids) == 3
    assert llm.generate(["0"], SamplingParams(max_tokens=3, temperature=1.0, top_p=5e-324,
                                              seed=2))[0].token_ids == greedy  # fmt: skip


def test_stream_holds_back_text_that_may_still_change():
    from kvforge.engine.request import Request, RequestMetrics
    from kvforge.engine.request import stable_text as _stable_text
    from kvforge.kvcache.block_table import BlockTable

    r = Request("r", None, [1], SamplingParams(stop=["END"]), BlockTable(16),
                RequestMetrics(arrival_s=0.0), frozenset())  # fmt: skip
    assert _stable_text(r, "caf\ufffd") == "caf"  # half of "é"
    assert _stable_text(r, "café") == "café"
    assert _stable_text(r, "the EN") == "the "  # may become "END"
    assert _stable_text(r, "the ENx") == "the ENx"
    r.finish_reason, r.text = "stop", "the "
    assert _stable_text(r, "the END") == "the "


def test_a_failing_forward_pass_aborts_its_requests_and_frees_blocks(llm, monkeypatch):
    def broken(batch):
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine.runner, "run", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate(["abc", "defg"], SamplingParams(max_tokens=4))
    assert_pool_whole(llm)
    assert not llm.engine.has_unfinished
    monkeypatch.undo()
    out = llm.generate(["abc"], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3


def test_scheduler_limits_and_devices_are_checked():
    with pytest.raises(KVForgeError, match=r"max_num_batched_tokens \(8\) must be at least "
                                           r"max_num_seqs \(16\)"):  # fmt: skip
        LLM(model="random", device="cpu", num_blocks=4, max_num_batched_tokens=8, max_num_seqs=16)
    with pytest.raises(KVForgeError, match="unknown device 'tpu'; use auto, cpu or cuda"):
        LLM(model="random", device="tpu", num_blocks=4)
    with pytest.raises(KVForgeError, match="device 'mps' is not supported"):
        LLM(model="random", device="mps", num_blocks=4)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(KVForgeError, match="device 'cuda' asked for, but torch sees no CUDA"):
            LLM(model="random", device="cuda", num_blocks=4)
    with pytest.raises(KVForgeError, match=r"the KV cache needs .* B but this machine has"):
        LLM(model="random", device="cpu", kv_memory="100TiB")
