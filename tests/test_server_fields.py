"""The completions and chat fields vLLM serves, through the official `openai` client and
raw HTTP, against a real server: several prompts, n and best_of, log-probabilities with
echo, penalties, logit_bias, min_tokens; vLLM's tokenizer routes; the body limit."""

import json
import math

import httpx
import openai
import pytest
import torch

from kvforge import SamplingParams
from test_server import GREEDY, MODEL, Server, new_llm, offline_text


@pytest.fixture(scope="module")
def server():
    s = Server(new_llm(kv_memory="8MiB"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def offline():
    return new_llm(kv_memory="8MiB")


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


# --- several prompts, n, best_of ---------------------------------------------------


def test_prompts_as_lists_give_one_choice_each_in_order(server, offline):
    texts = ["The cat", "A dog ran", "Hi"]
    ids = [offline.tokenizer.encode(t) for t in texts]
    expected = [offline_text(offline, t, max_tokens=6, ignore_eos=True) for t in texts]
    client = server.client()
    for prompt in (texts, ids):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, **GREEDY)
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert [c.text for c in out.choices] == expected
        assert out.usage.prompt_tokens == sum(len(i) for i in ids)
        assert out.usage.completion_tokens == 18
    server.wait_idle()


def test_n_samples_are_seeded_distinct_and_share_the_prompt_blocks(server):
    prompt = "x" * 100  # 101 tokens: 6 full 16-token blocks
    client = server.client()

    def ask(**kw):
        return client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=10, temperature=1.0, seed=11,
            extra_body={"ignore_eos": True, "cache_salt": "n-test"}, **kw,
        )  # fmt: skip

    out = ask(n=3)
    texts = [c.text for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len(set(texts)) == 3  # seed, seed + 1, seed + 2
    # the 2nd and 3rd samples took the 1st's six full blocks from the prefix cache
    assert out.usage.prompt_tokens_details.model_extra["shared_between_samples"] == 2 * 96
    assert out.usage.prompt_tokens == 101 and out.usage.completion_tokens == 30
    again = ask(n=3)
    assert [c.text for c in again.choices] == texts
    assert again.usage.prompt_tokens_details.cached_tokens == 96  # the first sample's hit
    one = ask(n=1)  # sample 0 of n is the request's own seed
    assert one.choices[0].text == texts[0]
    server.wait_idle()


def test_echoed_samples_score_the_prompt_once_and_share_its_blocks(server):
    prompt = "y" * 100
    out = _post(server, "/v1/completions", {
        "model": MODEL, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 3,
        "n": 3, "temperature": 1.0, "seed": 4, "ignore_eos": True}).json()  # fmt: skip
    echoed = [c["logprobs"]["token_logprobs"][:101] for c in out["choices"]]
    assert echoed[0] == echoed[1] == echoed[2] and echoed[0][0] is None
    assert all(c["text"].startswith(prompt) for c in out["choices"])
    assert out["usage"]["prompt_tokens_details"]["shared_between_samples"] == 2 * 96
    server.wait_idle()


def test_best_of_keeps_the_likeliest_samples(server):
    client = server.client()
    kw = dict(model=MODEL, prompt="Once", max_tokens=8, temperature=1.0, seed=3,
              extra_body={"ignore_eos": True})  # fmt: skip
    drawn = client.completions.create(n=4, logprobs=0, **kw)
    score = [sum(c.logprobs.token_logprobs) for c in drawn.choices]
    best = client.completions.create(n=2, best_of=4, **kw)
    order = sorted(range(4), key=lambda i: -score[i])[:2]
    assert [c.text for c in best.choices] == [drawn.choices[i].text for i in order]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.choices[0].logprobs is None  # ranked by them, not asked for
    assert best.usage.completion_tokens == 32  # every sample drawn counts
    server.wait_idle()


# --- log-probabilities -------------------------------------------------------------


def test_echo_returns_the_prompt_and_its_logprobs_equal_scoring(server, offline):
    text = "The quick brown fox jumps over the lazy dog."
    ids = offline.tokenizer.encode(text)
    scored = offline.engine.score(ids, chunk_size=4096)
    for max_tokens in (0, 1):
        out = server.client().completions.create(
            model=MODEL, prompt=text, echo=True, logprobs=3, max_tokens=max_tokens, **GREEDY
        )
        c = out.choices[0]
        lp = c.logprobs
        assert c.text.startswith(text) and len(lp.tokens) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        got = torch.tensor(lp.token_logprobs[1 : len(ids)])
        torch.testing.assert_close(got, scored, atol=1e-4, rtol=1e-4)
        assert lp.tokens[: len(ids)] == [offline.tokenizer.token_text(t) for t in ids]
        assert lp.text_offset == [
            sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids) + max_tokens)
        ]
        rows = zip(lp.tokens[1:], lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True)
        for token, top, chosen in rows:
            # the top 3 and the chosen token, keyed by text (bytes >= 128 share one: U+FFFD)
            assert top[token] == chosen and len(top) <= 4
            assert max(top.values()) >= chosen
        assert out.usage.completion_tokens == max_tokens
        assert c.finish_reason == "length"
    server.wait_idle()


def test_generated_logprobs_are_the_model_distribution(server, offline):
    captured = []
    runner = offline.engine.runner
    runner.logits_hook = lambda requests, logits: captured.append(logits.clone())
    try:
        expected = offline.generate(["Hello"], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    finally:
        runner.logits_hook = None
    out = server.client().completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, logprobs=2, **GREEDY
    )
    lp = out.choices[0].logprobs
    reference = torch.log_softmax(torch.cat(captured), dim=-1)
    chosen = reference.gather(1, torch.tensor(expected.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), chosen, atol=1e-5, rtol=1e-5)
    top2 = reference.topk(2, dim=-1).values
    for row, top in enumerate(lp.top_logprobs):
        assert sorted(top.values(), reverse=True)[:2] == pytest.approx(top2[row].tolist(), abs=1e-5)


def test_stream_with_n_logprobs_and_echo_matches_the_whole_answer(server):
    kw = dict(model=MODEL, prompt="Tell me", max_tokens=9, n=2, logprobs=1, echo=True,
              temperature=1.0, seed=5, extra_body={"ignore_eos": True})  # fmt: skip
    whole = server.client().completions.create(**kw)
    chunks = list(server.client().completions.create(stream=True, **kw))
    for index in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == whole.choices[index].text
        tokens = [t for c in mine if c.logprobs for t in c.logprobs.tokens]
        assert tokens == whole.choices[index].logprobs.tokens
        offsets = [o for c in mine if c.logprobs for o in c.logprobs.text_offset]
        assert offsets == whole.choices[index].logprobs.text_offset
        assert mine[-1].finish_reason == "length"
    server.wait_idle()


def test_chat_logprobs_n_and_streaming(server):
    client = server.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
              temperature=1.0, seed=9, n=2, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True})  # fmt: skip
    out = client.chat.completions.create(**kw)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content != out.choices[1].message.content
    for choice in out.choices:
        content = choice.logprobs.content
        assert len(content) == 6
        for item in content:
            assert len(item.top_logprobs) == 3
            assert item.bytes == list(item.token.encode())
            assert item.top_logprobs[0].logprob >= item.logprob
    chunks = list(client.chat.completions.create(stream=True, **kw))
    for index in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == out.choices[index].message.content
        streamed = [i.logprob for c in mine if c.logprobs for i in c.logprobs.content]
        # the same values, up to the order of float sums in a batch of another shape
        whole = [i.logprob for i in out.choices[index].logprobs.content]
        assert streamed == pytest.approx(whole, abs=1e-5)
    server.wait_idle()


# --- penalties, logit_bias, min_tokens ----------------------------------------------


def _vllm_processed(logits: torch.Tensor, prompt: list[int], output: list[int], p: dict):
    """vLLM's logits processing, written out from its definitions: logit_bias, then
    repetition (prompt and output tokens: positive logits divided, negative multiplied),
    frequency and presence (output tokens) penalties."""
    x = logits.clone()
    for token, bias in p.get("logit_bias", {}).items():
        x[int(token)] += bias
    r = p.get("repetition_penalty", 1.0)
    for t in set(prompt) | set(output):
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t in set(output):
        x[t] -= p.get("frequency_penalty", 0.0) * output.count(t)
        x[t] -= p.get("presence_penalty", 0.0)
    return x


@pytest.mark.parametrize(
    "penalties",
    [
        {"presence_penalty": 1.5},
        {"frequency_penalty": 0.8},
        {"repetition_penalty": 1.8},
        {"presence_penalty": -0.5, "frequency_penalty": 1.0, "repetition_penalty": 1.3,
         "logit_bias": {"101": 2.5, "32": -4.0}},
    ],
)  # fmt: skip
def test_penalties_follow_vllms_definitions(server, penalties):
    captured = []
    server.engine.runner.logits_hook = lambda requests, logits: captured.append(logits.clone())
    try:
        out = _post(server, "/v1/completions", {
            "model": MODEL, "prompt": "aaaa bbbb", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True,
            **penalties})  # fmt: skip
    finally:
        server.engine.runner.logits_hook = None
    assert out.status_code == 200, out.text
    tokens = out.json()["choices"][0]["logprobs"]["tokens"]
    chosen = [int(t.removeprefix("token_id:")) for t in tokens]
    prompt = server.engine.tokenizer.encode("aaaa bbbb")
    plain = [int(row.argmax()) for row in captured]
    for step, logits in enumerate(captured):
        x = _vllm_processed(logits[0], prompt, chosen[:step], penalties)
        assert chosen[step] == int(x.argmax()), f"step {step}"
    assert chosen != plain  # the penalties changed what greedy picks


def test_logit_bias_min_tokens_and_stop_lists_through_the_openai_client(server, offline):
    client = server.client()
    out = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=5, logit_bias={"65": 100}, **GREEDY
    )
    assert out.choices[0].text == "AAAAA"
    first = offline.generate(["Hi"], SamplingParams(max_tokens=1, ignore_eos=True))[0].token_ids[0]
    stopped = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=8, temperature=0,
        extra_body={"stop_token_ids": [first]},
    )  # fmt: skip
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    held = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=8, temperature=0, logprobs=0,
        extra_body={"stop_token_ids": [first], "min_tokens": 4,
                    "return_tokens_as_token_ids": True},
    )  # fmt: skip
    ids = [int(t.removeprefix("token_id:")) for t in held.choices[0].logprobs.tokens]
    assert len(ids) >= 4 and first not in ids[:4]
    full = offline_text(offline, "Hi", max_tokens=12, ignore_eos=True)
    stops = [full[5], full[3]]
    listed = client.completions.create(model=MODEL, prompt="Hi", max_tokens=12, stop=stops,
                                       **GREEDY)  # fmt: skip
    cut = min(full.find(s) for s in stops if full.find(s) >= 0)
    assert listed.choices[0].text == full[:cut]
    server.wait_idle()


def test_penalised_chat_through_the_openai_client(server):
    client = server.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "aaaa"}], max_tokens=10,
              temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    plain = client.chat.completions.create(**kw).choices[0].message.content
    penalised = client.chat.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kw)
    text = penalised.choices[0].message.content
    assert text != plain
    assert max(text.count(ch) for ch in set(text)) <= max(plain.count(ch) for ch in set(plain))
    server.wait_idle()


# --- tokenizer routes --------------------------------------------------------------


def test_tokenizer_routes_in_vllms_shapes(server, offline):
    tok = offline.tokenizer
    answer = _post(server, "/tokenize", {"prompt": "héllo"}).json()
    assert answer == {"tokens": tok.encode("héllo"), "count": 7, "max_model_len": 4096}
    bare = _post(server, "/tokenize", {"prompt": "hi", "add_special_tokens": False}).json()
    assert bare["tokens"] == [104, 105]
    messages = [{"role": "user", "content": "hi"}]
    chat = _post(server, "/tokenize", {"messages": messages}).json()
    # the ids /v1/chat/completions computes for these messages: a router hashes them
    assert chat["tokens"] == tok.encode("<|user|>\nhi\n<|assistant|>\n")
    body = {"model": MODEL, "messages": messages, "max_tokens": 1}
    usage = _post(server, "/v1/chat/completions", body).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]
    bare = _post(server, "/tokenize", {"messages": messages, "add_special_tokens": False})
    assert bare.json()["tokens"] == chat["tokens"][1:]  # without the BOS token
    assert _post(server, "/detokenize", {"tokens": answer["tokens"]}).json() == {
        "prompt": "<s>héllo"
    }
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
    assert info["model_max_length"] == 4096 and "chat_template" in info
    models = server.client().models.list().data[0]
    assert models.model_extra["max_model_len"] == 4096
    for path, body, words in [
        ("/detokenize", {"tokens": [5, 300]}, "token id 300 is outside the vocabulary [0, 258)"),
        ("/tokenize", {}, "either prompt or messages"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "is not served here"),
    ]:
        r = _post(server, path, body)
        assert r.status_code == 400 and words in r.json()["error"]["message"]


# --- the body limit ----------------------------------------------------------------


def test_a_body_over_the_limit_gets_413_and_the_server_keeps_serving():
    s = Server(new_llm(), max_request_bytes=1000)
    try:
        body = {"model": MODEL, "prompt": "x" * 2000, "max_tokens": 1}
        r = httpx.post(f"{s.url}/v1/completions", json=body)
        assert r.status_code == 413
        error = r.json()["error"]
        assert (
            "exceeds 1,000 bytes" in error["message"] and "--max-request-bytes" in error["message"]
        )

        def chunks():  # no Content-Length: counted as it arrives
            data = json.dumps(body).encode()
            for i in range(0, len(data), 300):
                yield data[i : i + 300]

        r = httpx.post(f"{s.url}/v1/completions", content=chunks(),
                       headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        with pytest.raises(openai.APIStatusError) as exc:
            s.client().completions.create(model=MODEL, prompt="y" * 2000, max_tokens=1)
        assert exc.value.status_code == 413
        ok = s.client().completions.create(model=MODEL, prompt="hi", max_tokens=2, **GREEDY)
        assert ok.usage.completion_tokens == 2
        s.wait_idle()
    finally:
        s.close()


def test_logprob_values_are_finite_json(server):
    out = _post(server, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 3,
                                            "logprobs": 5, "temperature": 0})  # fmt: skip
    values = out.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert all(math.isfinite(v) for v in values)
