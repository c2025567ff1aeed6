"""Prompt log-probabilities served by `kvforge serve` (echo + logprobs, what
lm-evaluation-harness scores with) are exact on the real model: equal to transformers'
log-softmax on the same GGUF file and to `kvforge eval`'s teacher-forced scoring, with the
prefix cache holding the prompt, several prompts in one request, other requests running,
and a quantized KV cache (then equal to kvforge's own scoring with that cache)."""

import httpx
import pytest
import torch
import transformers

from kvforge import LLM
from kvforge.models import catalog
from test_server import Server

TOL = dict(atol=1e-4, rtol=1e-4)
TEXTS = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of "
    "Italy is Rome, and the capital of Spain is Madrid.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n",
    "Water boils at 100 degrees Celsius at sea level.",
)


def smollm2(**options) -> LLM:
    return LLM(model="smollm2-135m-instruct", device="cpu", kv_memory="64MiB",
               weights_dtype="fp32", block_size=16, **options)  # fmt: skip


@pytest.fixture(scope="module")
def hf():
    path = catalog.smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def server():
    s = Server(smollm2())
    yield s
    s.close()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log p(token i | tokens < i), i = 1 .. n - 1, from transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def echo(server, prompts, **extra) -> list[dict]:
    body = {"model": "kvforge-builtin-untrained", "prompt": prompts, "echo": True,
            "logprobs": 1, "max_tokens": 1, "temperature": 0, **extra}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def served(choice: dict, n: int) -> torch.Tensor:
    values = choice["logprobs"]["token_logprobs"]
    assert values[0] is None and len(values) == n + 1  # the prompt, then one generated token
    return torch.tensor(values[1:n])


def test_prompt_logprobs_equal_transformers_and_scoring_with_the_prefix_cache_full(server, hf):
    tok = server.engine.tokenizer
    ids = [tok.encode(t) for t in TEXTS]
    # the first prompt's blocks are in the prefix cache: a plain request put them there
    httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": "kvforge-builtin-untrained", "prompt": ids[0], "max_tokens": 1})  # fmt: skip
    answer = echo(server, ids)  # three prompts, scheduled together
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    # every returned position ran through the model: nothing was served from the cache
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    offline = smollm2()
    for choice, prompt in zip(answer["choices"], ids, strict=True):
        got = served(choice, len(prompt))
        torch.testing.assert_close(got, hf_logprobs(hf, prompt), **TOL)
        torch.testing.assert_close(got, offline.engine.score(prompt), **TOL)
    plain = {"model": "kvforge-builtin-untrained", "prompt": ids[0], "max_tokens": 1}
    again = httpx.post(f"{server.url}/v1/completions", timeout=120, json=plain).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(ids[0]) // 16 * 16
    server.wait_idle()


def test_prompt_logprobs_while_other_requests_generate(server, hf):
    import threading

    tok = server.engine.tokenizer
    ids = tok.encode(TEXTS[2])
    background = threading.Thread(target=lambda: httpx.post(
        f"{server.url}/v1/completions", timeout=120,
        json={"model": "kvforge-builtin-untrained", "prompt": TEXTS[0], "max_tokens": 40,
              "ignore_eos": True, "n": 3, "temperature": 1.0}))  # fmt: skip
    background.start()
    got = served(echo(server, [ids])["choices"][0], len(ids))
    background.join()
    torch.testing.assert_close(got, hf_logprobs(hf, ids), **TOL)
    server.wait_idle()


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_prompt_logprobs_with_a_quantized_cache_equal_its_own_scoring(kv_dtype):
    s = Server(smollm2(kv_dtype=kv_dtype))
    try:
        tok = s.engine.tokenizer
        ids = [tok.encode(t) for t in TEXTS[:2]]
        answer = echo(s, ids)
        offline = smollm2(kv_dtype=kv_dtype)
        for choice, prompt in zip(answer["choices"], ids, strict=True):
            # one pass over the prompt, as the server's prefill of a short prompt
            own = offline.engine.score(prompt, chunk_size=len(prompt))
            torch.testing.assert_close(served(choice, len(prompt)), own, **TOL)
        s.wait_idle()
    finally:
        s.close()


def test_tokenize_parses_special_tokens_written_in_the_text(server):
    tok = server.engine.tokenizer
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "<|im_start|>user\nhi<|im_end|>"})
    tokens = r.json()["tokens"]
    assert tokens[0] == tok.hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokens[-1] == tok.hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["model_max_length"] == 8192
    assert "<|im_start|>" in info["chat_template"]
