"""`kvforge serve`: the OpenAI-compatible API, driven by the official `openai` client
against a real server on a free loopback port."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from kvforge import LLM, SamplingParams
from kvforge.chat_template import default_chat_prompt
from kvforge.server.app import build_app
from kvforge.server.protocol import ChatMessage
from process_util import served

MODEL = "kvforge-builtin-untrained"
KEY = "test-key"


class Server:
    """uvicorn serving `build_app(llm, ...)` on a thread, on a port the OS picks."""

    def __init__(self, llm: LLM, **options) -> None:
        self.llm = llm
        self.app = build_app(llm, MODEL, **options)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    @property
    def engine(self):
        return self.app.state.engine.engine

    def client(self, api_key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the engine holds no request and every block is back in the pool."""
        deadline = time.monotonic() + timeout
        while self.engine.scheduler.has_unfinished or self.engine.pool.num_used:
            assert time.monotonic() < deadline, "requests still hold blocks"
            time.sleep(0.01)
        self.engine.pool.check_integrity()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def new_llm(**options) -> LLM:
    return LLM(model="random", device="cpu", kv_memory=options.pop("kv_memory", "4MiB"), **options)


@pytest.fixture(scope="module")
def server():
    s = Server(new_llm())
    yield s
    s.close()


@pytest.fixture(scope="module")
def offline():
    """The same model outside the server: what the server must answer."""
    return new_llm()


def offline_text(llm: LLM, prompt: str, **params) -> str:
    return llm.generate([prompt], SamplingParams(**params))[0].text


# --- completions and chat ----------------------------------------------------------


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_completion_equals_offline_generation_with_usage(server, offline):
    out = server.client().completions.create(
        model=MODEL, prompt="The cat sat", max_tokens=12, **GREEDY
    )
    choice = out.choices[0]
    expected = offline_text(offline, "The cat sat", max_tokens=12, ignore_eos=True)
    assert choice.text == expected
    assert choice.finish_reason == "length"
    prompt_tokens = len(offline.engine.tokenizer.encode("The cat sat"))
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == prompt_tokens + 12
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    assert out.model == MODEL and out.object == "text_completion"
    server.wait_idle()


def test_completion_stream_concatenates_to_the_same_text_and_reports_usage(server, offline):
    chunks = list(
        server.client().completions.create(
            model=MODEL,
            prompt="The cat sat",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline_text(offline, "The cat sat", max_tokens=12, ignore_eos=True)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    server.wait_idle()


def test_completion_from_token_ids(server, offline):
    ids = [256, 72, 105]  # BOS, "H", "i"
    out = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=5, **GREEDY)
    expected = offline.generate([ids], SamplingParams(max_tokens=5, ignore_eos=True))[0].text
    assert out.choices[0].text == expected
    assert out.usage.prompt_tokens == 3


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello!"},
]


def test_chat_uses_the_default_template_streaming_or_not(server, offline):
    prompt = default_chat_prompt([ChatMessage(**m).as_dict() for m in MESSAGES])
    assert prompt == "<|system|>\nYou are terse.\n<|user|>\nHello!\n<|assistant|>\n"
    expected = offline_text(offline, prompt, max_tokens=10, ignore_eos=True)
    client = server.client()
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, **GREEDY)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(offline.engine.tokenizer.encode(prompt))
    assert out.usage.completion_tokens == 10
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=10, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens
    server.wait_idle()


def test_seeds_reproduce_sampled_text(server):
    client = server.client()

    def sample(seed: int) -> str:
        out = client.completions.create(
            model=MODEL, prompt="Once", max_tokens=24, temperature=1.0, top_p=0.95, seed=seed,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return out.choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_string_ends_the_text_before_it(server, offline):
    full = offline_text(offline, "abc", max_tokens=20, ignore_eos=True)
    # the first character that is new at its position (the random model repeats a lot)
    at = next(i for i, ch in enumerate(full) if i > 0 and ch.isprintable() and ch not in full[:i])
    stop = full[at]
    for stream in (False, True):
        res = server.client().completions.create(
            model=MODEL, prompt="abc", max_tokens=20, stop=[stop], stream=stream, **GREEDY
        )
        chunks = list(res) if stream else [res]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == full[:at]
        assert chunks[-1].choices[0].finish_reason == "stop"
    server.wait_idle()


def test_models_health_and_metrics_while_requests_run(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    stream = server.client().completions.create(
        model=MODEL, prompt="x" * 200, max_tokens=400, stream=True, **GREEDY
    )
    next(iter(stream))  # the request holds its blocks now
    during = httpx.get(f"{server.url}/metrics")
    assert during.headers["content-type"].startswith("text/plain")
    values = _metrics(during.text)
    assert values["kvforge_kv_blocks_used"] >= (201 + 16 - 1) // 16
    assert values["kvforge_kv_cache_usage_ratio"] == pytest.approx(
        values["kvforge_kv_blocks_used"] / values["kvforge_kv_blocks_total"]
    )
    assert values["kvforge_num_requests_running"] == 1
    assert values["kvforge_kv_blocks_window"] == 0  # an fp32 cache borrows no window blocks
    stream.close()
    server.wait_idle()
    after = _metrics(httpx.get(f"{server.url}/metrics").text)
    assert after["kvforge_kv_blocks_used"] == 0
    assert after["kvforge_kv_blocks_free"] == after["kvforge_kv_blocks_total"]
    assert after["kvforge_prompt_tokens_total"] >= 201
    assert after["kvforge_generation_tokens_total"] >= 1
    assert after["kvforge_time_to_first_token_seconds_count"] >= 1
    assert after["kvforge_inter_token_latency_seconds_count"] >= 1
    assert after["kvforge_num_preemptions_total"] == 0
    # every admitted prompt is looked up in the prefix cache
    assert after["kvforge_prefix_cache_queries_total"] == after["kvforge_prompt_tokens_total"]
    assert (
        0 <= after["kvforge_prefix_cache_hits_total"] <= after["kvforge_prefix_cache_queries_total"]
    )


def _metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


# --- safety -------------------------------------------------------------------------


def _post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, **kwargs)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ('{"model": "x", "prompt": ', None, "not valid JSON"),
        ("[1, 2]", None, "valid dictionary"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"model": MODEL, "prompt": 7}, "prompt", ""),
        ({"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
        ({"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature", "or equal to 0"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens", "0 only with echo"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": -3}, "max_tokens", "or equal to 0"),
        ({"model": MODEL, "prompt": "hi", "n": 0}, "n", "greater than or equal to 1"),
        ({"model": MODEL, "prompt": "hi", "n": 129}, "n", "less than or equal to 128"),
        ({"model": MODEL, "prompt": "hi", "n": 3, "best_of": 2}, "best_of", "at least n (3)"),
        ({"model": MODEL, "prompt": "hi", "best_of": 2, "stream": True}, "best_of", "stream"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 21}, "logprobs", "at most 20 (the server"),
        ({"model": MODEL, "prompt": "hi", "logprobs": -1}, "logprobs", "or equal to 0"),
        (
            {"model": MODEL, "prompt": "hi", "presence_penalty": 2.5},
            "presence_penalty",
            "less than or equal to 2",
        ),
        (
            {"model": MODEL, "prompt": "hi", "frequency_penalty": -3},
            "frequency_penalty",
            "greater than or equal to -2",
        ),
        (
            {"model": MODEL, "prompt": "hi", "repetition_penalty": 0},
            "repetition_penalty",
            "greater than 0",
        ),
        (
            {"model": MODEL, "prompt": "hi", "min_tokens": 20, "max_tokens": 5},
            "min_tokens",
            "must not exceed max_tokens (5)",
        ),
        ({"model": MODEL, "prompt": "hi", "logit_bias": {"7": 101}}, "logit_bias", "[-100, 100]"),
        ({"model": MODEL, "prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"model": MODEL, "prompt": ["hi"] * 65}, "prompt", "at most 64 (the server's"),
        ({"model": MODEL, "prompt": ["hi", ""]}, "prompt", "prompt 1 is empty"),
        ({"model": MODEL, "prompt": [[1], [2, 999]]}, None, "prompt 1: prompt token id 999"),
        ({"model": MODEL, "prompt": "hi", "suffix": "x"}, "suffix", "not supported"),
        ({"model": MODEL, "prompt": ""}, "prompt", "at least 1"),
        ({"model": MODEL, "prompt": [1, 99999]}, None, "outside the vocabulary [0, 258)"),
        ({"prompt": "hi"}, "model", "Field required"),
    ],
)
def test_bad_completion_requests_get_400_naming_the_problem(server, body, param, words):
    error = _error(_post(server, "/v1/completions", body), 400)
    assert words in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_unknown_model_and_limits_get_400_naming_the_limit(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="gpt-4", prompt="hi")
    assert exc.value.code == "model_not_found"
    assert "'gpt-4' is not served here" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5000)
    assert "exceeds the model's context of 4096 tokens" in exc.value.message
    pool_tokens = server.engine.pool.num_blocks * server.engine.store.block_size
    assert pool_tokens < 4096  # a 4 MiB pool holds less than the context
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="a" * (pool_tokens + 10), max_tokens=1)
    assert f"the pool has {server.engine.pool.num_blocks}" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[])
    assert exc.value.param == "messages"
    server.wait_idle()


def test_engine_failure_answers_500_and_the_server_keeps_serving(server, monkeypatch):
    runner = server.engine.runner
    real_run = runner.run
    calls = []

    def fail_once(batch):
        if not calls:
            calls.append(1)
            raise RuntimeError("injected")
        return real_run(batch)

    monkeypatch.setattr(runner, "run", fail_once)
    client = server.client()
    with pytest.raises(openai.InternalServerError) as exc:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, **GREEDY)
    assert "RuntimeError: injected" in exc.value.message
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=4, **GREEDY)
    assert out.usage.completion_tokens == 4
    server.wait_idle()


def test_api_key_is_required_when_set():
    s = Server(new_llm(), api_key=KEY)
    try:
        with pytest.raises(openai.AuthenticationError) as exc:
            s.client(api_key="wrong").models.list()
        assert exc.value.code == "invalid_api_key"
        _error(httpx.get(f"{s.url}/v1/models"), 401)
        assert [m.id for m in s.client().models.list().data] == [MODEL]
        assert httpx.get(f"{s.url}/health").status_code == 200  # probes need no key
    finally:
        s.close()


def test_a_full_queue_gets_429_and_running_requests_finish():
    s = Server(new_llm(max_num_seqs=1), max_queue=1)
    try:
        client = s.client()
        first = client.completions.create(
            model=MODEL, prompt="a", max_tokens=300, stream=True, **GREEDY
        )
        next(iter(first))
        second = client.completions.create(
            model=MODEL, prompt="b", max_tokens=3, stream=True, **GREEDY
        )
        with pytest.raises(openai.RateLimitError) as exc:
            client.completions.create(model=MODEL, prompt="c", max_tokens=3)
        assert "max_num_seqs + max_queue = 2" in exc.value.message
        assert exc.value.code == "rate_limit_exceeded"
        assert len("".join(c.choices[0].text for c in first)) > 0
        assert [c.choices[0].finish_reason for c in second][-1] == "length"
        s.wait_idle()
        assert client.completions.create(model=MODEL, prompt="c", max_tokens=3).choices
    finally:
        s.close()


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(server):
    body = {"model": MODEL, "prompt": "x" * 100, "max_tokens": 1000, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.engine.pool.num_used > 0
    server.wait_idle()  # the request was aborted: far fewer than 1000 tokens were made
    assert _metrics(httpx.get(f"{server.url}/metrics").text)["kvforge_kv_blocks_used"] == 0


@pytest.mark.slow
def test_non_streaming_client_disconnect_aborts_too(server):
    body = {"model": MODEL, "prompt": "y" * 50, "max_tokens": 1900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    server.wait_idle()


def test_64_concurrent_streaming_clients_all_complete_and_the_pool_is_whole():
    s = Server(new_llm(kv_memory="64MiB", max_num_seqs=32))

    async def one(client, i: int) -> tuple[str, int]:
        stream = await client.completions.create(
            model=MODEL, prompt=f"request {i}:", max_tokens=8 + i % 9, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )  # fmt: skip
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def run_all():
        client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    try:
        results = asyncio.run(run_all())
        assert [n for _, n in results] == [8 + i % 9 for i in range(64)]
        offline = new_llm()
        for i in (0, 17, 63):
            assert results[i][0] == offline_text(
                offline, f"request {i}:", max_tokens=8 + i % 9, ignore_eos=True
            )
        s.wait_idle()
        assert s.engine.pool.num_free == s.engine.pool.num_blocks
    finally:
        s.close()


def test_kvforge_serve_command_answers_the_openai_client(tmp_path):
    with served("--model", "random", "--kv-memory", "4MiB", "--device", "cpu",
                "--api-key", KEY, timeout_s=60) as (_, url):  # fmt: skip
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=6, stream=True, **GREEDY
            )
        )
        assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_kvforge_serve_bad_options_exit_2(capsys):
    from kvforge.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be in 0..65535, got 70000" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--max-queue", "-1"])
    assert exc.value.code == 2


CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def _checkpoint_with_chat_template(directory):
    """A tiny random Llama whose word-level tokenizer carries a chat template."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "[system]", "[user]", "[assistant]", "hello", "world"]
    words += [f"w{i}" for i in range(56)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_chat_uses_the_checkpoints_chat_template(tmp_path):
    import transformers

    directory = _checkpoint_with_chat_template(tmp_path)
    messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "hello"}]
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "[system] w1 w2 [user] hello [assistant]"
    ids = hf(text, add_special_tokens=False)["input_ids"]
    offline = LLM(model=str(directory), device="cpu", kv_memory="1MiB")
    expected = offline.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    s = Server(LLM(model=str(directory), device="cpu", kv_memory="1MiB"))
    try:
        out = s.client().chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, **GREEDY
        )
        assert out.usage.prompt_tokens == len(ids) == 6
        assert out.choices[0].message.content == expected.text
    finally:
        s.close()


def test_usage_reports_cached_tokens_and_salts_isolate_tenants(server):
    client = server.client()
    prompt = "A shared system prompt that many requests start with. " * 12

    def cached(**extra) -> int:
        out = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=2, temperature=0, extra_body=extra
        )
        return out.usage.prompt_tokens_details.cached_tokens

    full_blocks = (len(prompt) + 1 - 1) // 16 * 16  # BOS + bytes; the last token computed
    cached(cache_salt="t1")
    assert cached(cache_salt="t1") == full_blocks
    assert cached(cache_salt="t2") == 0
    _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "cache_salt": 5}), 400)
    server.wait_idle()


def test_metrics_show_prefix_cache_and_tier_traffic(tmp_path):
    s = Server(new_llm(disk_cache_dir=str(tmp_path), host_cache_memory="1MiB"))
    try:
        prompt = "tiers " * 40
        for _ in range(2):
            s.client().completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
        page = httpx.get(f"{s.url}/metrics").text
        values = _metrics(page)
        assert values["kvforge_prefix_cache_hits_total"] == (len(prompt) + 1 - 1) // 16 * 16
        assert values["kvforge_prefix_cache_evictions_total"] == 0
        files = len(list(tmp_path.glob("*.kvblock")))
        assert files > 0
        assert f'kvforge_cache_tier_blocks{{tier="disk"}} {float(files)}' in page
        assert f'kvforge_cache_tier_operations_total{{op="put",tier="disk"}} {float(files)}' in page
        assert 'kvforge_cache_tier_blocks{tier="host"} 0.0' in page
    finally:
        s.close()


def test_queued_deltas_are_merged_into_one_event_per_choice():
    from kvforge.server.app import _deltas
    from kvforge.server.async_engine import Delta, RequestStream

    async def drain():
        queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        streams = [RequestStream(f"r{i}", loop, queue, index=i) for i in range(2)]
        for delta in (Delta("a", 0, (1,)), Delta("x", 1, (7,)), Delta("b", 0, (2,)),
                      Delta("c", 0, (3,), finished=True, completion_tokens=3),
                      Delta("y", 1, (8,), finished=True, completion_tokens=2)):  # fmt: skip
            queue.put_nowait(delta)
        return [d async for d in _deltas(queue, streams)], streams

    merged, streams = asyncio.run(drain())
    assert merged == [
        Delta("abc", 0, (1, 2, 3), finished=True, completion_tokens=3),
        Delta("xy", 1, (7, 8), finished=True, completion_tokens=2),
    ]
    assert all(s.finished for s in streams)


def test_a_server_over_an_int2_cache_streams_the_offline_text():
    llm = new_llm(kv_dtype="int2", kv_memory="8MiB")
    prompt = "The quick brown fox jumps over the lazy dog. " * 3  # 136 tokens: 2 blocks
    expected = offline_text(new_llm(kv_dtype="int2", kv_memory="8MiB"), prompt, max_tokens=40,
                            ignore_eos=True)  # fmt: skip
    s = Server(llm)
    try:
        chunks = s.client().completions.create(
            model=MODEL, prompt=prompt, max_tokens=40, stream=True, **GREEDY
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        s.wait_idle()
        assert llm.engine.store.window.slots == {}
        llm.engine.pool.check_integrity()
    finally:
        s.close()


def test_a_request_names_its_eviction_policy():
    prompt = "The quick brown fox jumps over the lazy dog. " * 2
    policy = new_llm(kv_policy="streaming", kv_budget=32)
    expected = offline_text(policy, prompt, max_tokens=120, ignore_eos=True)
    full = offline_text(new_llm(), prompt, max_tokens=120, ignore_eos=True)
    assert expected != full  # the policy changes what the model sees
    s = Server(new_llm())
    try:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 120, "ignore_eos": True,
                "kv_policy": "streaming", "kv_budget": 32, "temperature": 0}  # fmt: skip
        r = httpx.post(f"{s.url}/v1/completions", json=body,
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
        bad = httpx.post(f"{s.url}/v1/completions", json={**body, "kv_policy": "lru"},
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
        assert bad.status_code == 400
        assert "unknown kv_policy 'lru'" in bad.json()["error"]["message"]
        s.wait_idle()
    finally:
        s.close()
