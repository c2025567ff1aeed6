"""The shipped trained model (kvforge and transformers agree on it), `kvforge eval`'s tasks
at a tiny size, and the training script: a few steps, resumed exactly."""

import json
import math
import random

import pytest
import torch

from kvforge import LLM, SamplingParams
from kvforge.cli import main
from kvforge.eval import tasks
from kvforge.kvcache.formats import window_blocks
from kvforge.models.builtin import MINI_MODEL_DIR
from kvforge.training.data import (
    FILLER,
    HELD_OUT,
    passkey_doc,
    passkey_prompt,
    python_sources,
)

TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x):\n"


@pytest.fixture(scope="module")
def default_llm():
    return LLM(model="kvforge-mini", device="cpu", kv_memory="32MiB")


def test_the_shipped_model_is_small_and_complete():
    names = {p.name for p in MINI_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert sum(p.stat().st_size for p in MINI_MODEL_DIR.iterdir()) <= 25 * 2**20
    config = json.loads((MINI_MODEL_DIR / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["max_position_embeddings"] >= 2048


def test_kvforge_and_transformers_give_the_same_tokens_and_logits(default_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(MINI_MODEL_DIR))
    ids = default_llm.engine.tokenizer.encode(TEXT)
    assert ids == hf_tok(TEXT)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(str(MINI_MODEL_DIR)).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])
    ours = default_llm.engine.score(ids, chunk_size=5)  # chunked through the paged cache
    torch.testing.assert_close(ours, expected.squeeze(1), rtol=0, atol=1e-4)
    greedy = default_llm.generate([TEXT], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert greedy.token_ids == hf_out[0, len(ids) :].tolist()


def test_score_leaves_the_pool_whole_and_refuses_a_busy_engine(default_llm):
    from kvforge.errors import KVForgeError

    free = default_llm.kv_stats()["blocks_free"]
    default_llm.engine.score(list(range(1, 40)), chunk_size=7)
    assert default_llm.kv_stats()["blocks_free"] == free
    default_llm.engine.add_request("hello", SamplingParams(max_tokens=2))
    with pytest.raises(KVForgeError, match="score needs an engine with no requests in flight"):
        default_llm.engine.score([1, 2, 3])
    while default_llm.engine.has_unfinished:
        default_llm.engine.step()


# --- data -------------------------------------------------------------------------------


def test_held_out_modules_never_reach_training():
    train = {p.name for p in python_sources()}
    held = python_sources(held_out=True)
    assert held and {"textwrap.py", "heapq.py"} <= {p.name for p in held}
    assert not {"textwrap.py", "heapq.py", "csv.py"} & train
    assert all(p.name in HELD_OUT or p.parent.name in HELD_OUT for p in held)


def test_passkey_documents_are_seeded_and_fit_the_asked_length(default_llm):
    a = passkey_doc(random.Random(3), 5, 0.5)
    assert a == passkey_doc(random.Random(3), 5, 0.5)
    assert a.prompt.count(FILLER) == 5 and f"The pass key is: {a.answer}." in a.prompt
    encode = default_llm.engine.tokenizer.encode
    for tokens in (100, 300):
        ids, key = passkey_prompt(encode, tokens, 0.25, seed=7)
        assert tokens - 25 <= len(ids) <= tokens  # within one filler sentence of the ask
        assert key in default_llm.engine.tokenizer.decode(ids)


# --- tasks --------------------------------------------------------------------------------


def test_perplexity_scores_exactly_the_tokens_asked_and_agrees_with_transformers(default_llm):
    from transformers import AutoModelForCausalLM

    result = tasks.perplexity(default_llm, TEXT * 20, context=64, max_tokens=100, chunk=16)
    assert result["tokens_scored"] == 100 and result["windows"] == 2
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    assert result["kv_bytes_per_request"] == 4 * default_llm.kv_stats()["bytes_per_token"] * 16
    # the same windows through transformers
    ids = default_llm.engine.tokenizer.encode(TEXT * 20)
    hf = AutoModelForCausalLM.from_pretrained(str(MINI_MODEL_DIR)).eval()
    nll, n = 0.0, 0
    for window, keep in ((ids[:64], 63), ([ids[0], *ids[64:101]], 37)):
        with torch.no_grad():
            logits = hf(torch.tensor([window])).logits[0, :-1]
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:])[:, None])
        nll -= float(lp[:keep].sum())
        n += keep
    assert n == 100 and result["nll"] == pytest.approx(nll / n, abs=1e-4)


def test_passkey_grid_and_heat_map(default_llm, tmp_path):
    """kvforge-mini finds every key with its whole cache; keeping only the last 48
    tokens (sliding) loses a key hidden at the start of 128 tokens, not one at the end."""
    result = tasks.passkey(default_llm, lengths=(64, 128), depths=(0.0, 1.0), trials=2)
    assert result["accuracy"] == [[1.0, 1.0], [1.0, 1.0]]
    assert result["mean_accuracy"] == 1.0
    assert set(result["kv_bytes_per_request"]) == {"64", "128"}
    pruned = tasks.passkey(default_llm, lengths=(128,), depths=(0.0, 1.0), trials=2,
                           policy=("sliding", 48))  # fmt: skip
    assert pruned["accuracy"] == [[0.0, 1.0]]
    tasks.heat_map(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_agreement_counts_tokens_and_kl_up_to_the_first_difference():
    """The first run agrees at both steps; the second differs at step 1, so step 2 (whose
    history differs) counts in agreement but not in KL. KL(ref || run), known values."""
    import math

    from kvforge.eval.quality import agreement

    def lp(*probs):
        return torch.tensor(probs).log()

    reference = [
        ([0, 1], [lp(0.5, 0.5), lp(0.9, 0.1)]),
        ([1, 0, 1], [lp(0.2, 0.8), lp(0.5, 0.5), lp(0.3, 0.7)]),
    ]
    run = [
        ([0, 1], [lp(0.5, 0.5), lp(0.6, 0.4)]),
        ([1, 1, 1], [lp(0.4, 0.6), lp(0.1, 0.9), lp(0.99, 0.01)]),
    ]
    same, mean_kl = agreement(run, reference)
    kl_a = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    kl_b = 0.2 * math.log(0.2 / 0.4) + 0.8 * math.log(0.8 / 0.6)
    kl_c = 0.5 * math.log(0.5 / 0.1) + 0.5 * math.log(0.5 / 0.9)  # the differing step itself
    assert same == 4 / 5
    assert mean_kl == pytest.approx((0.0 + kl_a + kl_b + kl_c) / 4, rel=1e-5)


def test_agreement_of_a_quantized_cache_with_the_full_one():
    """160-token prompts: int4's first 64-token block leaves the 32-token full-precision
    window and is packed, so the distributions move a little (a 54-token request would
    stay in the window, exact)."""
    llm = LLM(model="kvforge-mini", device="cpu", kv_memory="16MiB", kv_dtype="int4")
    reference = LLM(model="kvforge-mini", device="cpu", kv_memory="16MiB", kv_dtype="fp32")
    result = tasks.agreement(llm, reference, count=2, tokens=160, new_tokens=6)
    assert result["reference_kv_dtype"] == "fp32" and result["kv_dtype"] == "int4"
    assert 1e-6 < result["mean_kl"] < 1  # int4 moves the distributions, a little
    assert 0 <= result["token_agreement"] <= 1
    # 160 prompt and 5 generated tokens held: three 64-token blocks, two of them in the
    # full-precision window
    store = llm.engine.store
    assert result["prompts"] == 2 and result["peak_kv_tokens"] == 165
    # full-precision window, in blocks the request borrows while it runs
    stats = llm.kv_stats()
    window = stats["window_blocks_per_request"]
    assert window == window_blocks(store.spec, store.format, 64) > 0
    assert result["kv_bytes_per_request"] == (3 + window) * 64 * stats["bytes_per_token"]


def test_eval_cli_json_out_and_errors(tmp_path, capsys):
    assert main(["eval", "passkey", "--lengths", "64", "--depths", "0.5", "--trials", "1",
                 "--device", "cpu", "--kv-dtype", "int8", "--json", "--model", "kvforge-mini",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["kv_dtype"] == "int8" and data["lengths"] == [64] and data["depths"] == [0.5]
    assert (tmp_path / "passkey.json").exists() and (tmp_path / "passkey.png").exists()
    assert main(["eval", "passkey", "--depths", "2", "--device", "cpu"]) == 2
    assert "--depths must lie in 0..1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "passkey", "--kv-policy", "lru", "--kv-budget", "64"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'lru'" in capsys.readouterr().err
    assert main(["eval", "passkey", "--lengths", "9000", "--device", "cpu",
                 "--model", "kvforge-mini"]) == 2  # fmt: skip
    assert "passkey length 9000 + 8 answer tokens exceeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "passkey", "--lengths", "a,b"])


# --- training -----------------------------------------------------------------------------


def test_the_training_script_runs_and_resumes_exactly(tmp_path):
    from kvforge.training.train import TrainConfig, train

    tiny = TrainConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=2, num_kv_heads=1, max_position_embeddings=128, seq_len=64,
                       batch_size=2, long_every=2, copy_steps=1, copy_seq_len=32, copy_batch_size=2,
                       steps=2, warmup=1, checkpoint_every=2,
                       tokenizer_chars=20_000, max_files=3)  # fmt: skip
    first = train(tiny, tmp_path / "a", log=lambda _: None)
    assert len(first["loss"]) == 3 and all(math.isfinite(x) for x in first["loss"])
    llm = LLM(model=str(tmp_path / "a" / "model"), device="cpu", kv_memory="4MiB")
    assert len(llm.generate(["def f("], SamplingParams(max_tokens=3))[0].token_ids) <= 3
    # a run stopped after step 2 (its checkpoint) and resumed equals an unbroken one
    stopped = train(tiny, tmp_path / "b", stop_after=2, log=lambda _: None)
    assert len(stopped["loss"]) == 2 and not (tmp_path / "b" / "model").exists()
    resumed = train(tiny, tmp_path / "b", resume=True, log=lambda _: None)
    assert resumed["loss"][:2] == stopped["loss"]
    assert resumed["loss"] == pytest.approx(first["loss"], abs=1e-5)
