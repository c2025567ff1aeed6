"""The Llama-family model against transformers, and the loader's checks.

Each architecture is a random-init transformers model saved with
save_pretrained and loaded by `load_model`; our logits (paged KV, flat
batches, decode steps) must equal transformers' eager logits.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from kvforge.attention import AttentionMetadata
from kvforge.errors import ConfigError
from kvforge.kvcache.formats import get_kv_format
from kvforge.kvcache.store import KVStore
from kvforge.models.builtin import BUILTIN_NAME, ByteTokenizer, builtin_model
from kvforge.models.llama import LlamaForCausalLM, ModelConfig
from kvforge.models.loader import SUPPORTED_ARCHITECTURES, load_model
from kvforge.models.rope import rope_inv_freq
from kvforge.models.tokenizer import load_tokenizer

VOCAB = 128
BLOCK_SIZE = 4
NUM_BLOCKS = 24
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CONFIGS = {
    "llama-gqa": (transformers.LlamaConfig, {}),
    "llama-bias": (transformers.LlamaConfig, {"attention_bias": True}),
    "llama3-rope": (transformers.LlamaConfig, {"rope_parameters": LLAMA3_ROPE}),
    "llama-tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "mistral-mqa-window": (
        transformers.MistralConfig,
        {"num_key_value_heads": 1, "sliding_window": 8, "head_dim": 16},
    ),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32}),  # head_dim != hidden / heads
}
LLAMA_ARCH = {"architectures": ["LlamaForCausalLM"]}
PROMPT_A = [(7 * i + 3) % VOCAB for i in range(20)]
PROMPT_B = [(11 * i + 5) % VOCAB for i in range(13)]


def hf_model(name: str, **overrides) -> transformers.PreTrainedModel:
    config_class, extra = CONFIGS[name]
    config = config_class(**{**SMALL, **extra, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # HF zeroes biases and sets norms to 1: randomise them so a missing or
    # misnamed bias or norm weight changes the logits.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in param_name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model.eval()


def hf_logits(model: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # [L, vocab]


def step(
    model: LlamaForCausalLM,
    kv: KVStore,
    seqs: list[tuple[list[int], int, list[int]]],  # (new token ids, cached tokens, block table)
) -> torch.Tensor:  # [T, vocab]
    """One forward over a flat batch, with hand-built metadata."""
    ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    for new_ids, cached, table in seqs:
        for pos in range(cached, cached + len(new_ids)):
            positions.append(pos)
            slots.append(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        ids += new_ids
        starts.append(starts[-1] + len(new_ids))
        seq_lens.append(cached + len(new_ids))
    width = max(len(table) for _, _, table in seqs)
    tables = [table + [0] * (width - len(table)) for _, _, table in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=tuple(starts),
        seq_lens=tuple(seq_lens),
        block_tables=torch.tensor(tables),
        block_size=BLOCK_SIZE,
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.tensor(positions), kv, meta)
        return model.compute_logits(hidden)


def new_store(model: LlamaForCausalLM, kv_dtype: str = "fp32") -> KVStore:
    return KVStore(model.config.spec, get_kv_format(kv_dtype), NUM_BLOCKS, BLOCK_SIZE)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    ref = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, load_model(path)


# Block tables are deliberately scattered and out of order.
TABLE_A = [11, 3, 17, 1, 6, 20]  # 24 tokens
TABLE_B = [9, 2, 14, 23]  # 16 tokens


def test_prefill_then_decode_matches_transformers(pair) -> None:
    ref, model = pair
    kv = new_store(model)
    assert_logits_close(step(model, kv, [(PROMPT_A, 0, TABLE_A)]), hf_logits(ref, PROMPT_A))
    extended = [*PROMPT_A, 42]
    logits = step(model, kv, [([42], len(PROMPT_A), TABLE_A)])  # query_len 1
    assert_logits_close(logits[0], hf_logits(ref, extended)[-1])


def test_flat_batch_of_two_sequences_matches_transformers(pair) -> None:
    ref, model = pair
    kv = new_store(model)
    logits = step(model, kv, [(PROMPT_A, 0, TABLE_A), (PROMPT_B, 0, TABLE_B)])
    assert_logits_close(logits[: len(PROMPT_A)], hf_logits(ref, PROMPT_A))
    assert_logits_close(logits[len(PROMPT_A) :], hf_logits(ref, PROMPT_B))
    # A batched decode step, then a mixed step (decode of A, a 2-token chunk of B).
    logits = step(model, kv, [([5], len(PROMPT_A), TABLE_A), ([9], len(PROMPT_B), TABLE_B)])
    assert_logits_close(logits[0], hf_logits(ref, [*PROMPT_A, 5])[-1])
    assert_logits_close(logits[1], hf_logits(ref, [*PROMPT_B, 9])[-1])
    logits = step(model, kv, [([6], 21, TABLE_A), ([1, 2], 14, TABLE_B)])
    assert_logits_close(logits[0], hf_logits(ref, [*PROMPT_A, 5, 6])[-1])
    assert_logits_close(logits[1:], hf_logits(ref, [*PROMPT_B, 9, 1, 2])[-2:])


def test_parameters_load_by_hf_names(pair) -> None:
    ref, model = pair
    ours = dict(model.named_parameters())
    for name, param in ref.named_parameters():
        assert torch.equal(ours[name], param), name
    assert model.config.architecture == type(ref).__name__


def test_tied_embeddings_share_one_tensor(pair) -> None:
    ref, model = pair
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == bool(ref.config.tie_word_embeddings)


def test_rope_frequencies_equal_transformers(pair) -> None:
    ref, model = pair
    config = model.config
    ours = rope_inv_freq(config.spec.head_dim, config.rope_theta, config.rope_scaling)
    assert torch.equal(ours, ref.model.rotary_emb.inv_freq)


def test_llama3_rope_scaling_is_read_from_both_spellings() -> None:
    new_style = ModelConfig.from_hf_config(
        {**SMALL, **LLAMA_ARCH, "rope_parameters": LLAMA3_ROPE}, "x"
    )
    legacy_scaling = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    legacy = ModelConfig.from_hf_config(
        {
            **SMALL,
            **LLAMA_ARCH,
            "rope_theta": 500000.0,
            "rope_scaling": {"type": "llama3", **legacy_scaling},
        },
        "x",
    )
    assert new_style.rope_scaling is not None and new_style.rope_scaling.factor == 8.0
    assert (new_style.rope_theta, new_style.rope_scaling) == (
        legacy.rope_theta,
        legacy.rope_scaling,
    )


def test_config_errors_name_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"rope type 'yarn'.*supported: default, llama3"):
        ModelConfig.from_hf_config({**SMALL, "rope_scaling": {"rope_type": "yarn"}}, "x")
    with pytest.raises(ConfigError, match="needs 'low_freq_factor'"):
        ModelConfig.from_hf_config({**SMALL, "rope_scaling": {"type": "llama3", "factor": 8}}, "x")
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf_config({**SMALL, "hidden_act": "gelu"}, "x")
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        ModelConfig.from_hf_config({**SMALL, "architectures": ["GPT2LMHeadModel"]}, "x")


def test_eos_token_id_may_be_int_or_list() -> None:
    for eos, expected in ((2, (2,)), ([1, 7], (1, 7)), (None, ())):
        config = ModelConfig.from_hf_config({**SMALL, **LLAMA_ARCH, "eos_token_id": eos}, "x")
        assert config.eos_token_ids == expected


def test_bf16_checkpoint_loads_in_bf16(tmp_path: Path) -> None:
    ref = hf_model("llama-gqa").to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    for dtype in ("auto", "bf16"):
        model = load_model(tmp_path, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.config.spec.dtype == "bf16"
    logits = step(model, new_store(model, "bf16"), [(PROMPT_A, 0, TABLE_A)])
    # bf16 rounding differs between our float32 attention and HF's bf16 matmuls.
    assert_logits_close(logits, hf_logits(ref, PROMPT_A), rtol=3e-2)
    fp32 = load_model(tmp_path, dtype="fp32")
    assert fp32.model.norm.weight.dtype == torch.float32


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    ref = hf_model("qwen2")
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load_model(tmp_path)
    kv = new_store(model)
    assert_logits_close(step(model, kv, [(PROMPT_B, 0, TABLE_B)]), hf_logits(ref, PROMPT_B))


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="GPT2LMHeadModel is not supported") as info:
        load_model(tmp_path)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(info.value)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    hf_model("llama-gqa").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.down_proj"):
        load_model(tmp_path)


def test_wrong_shape_and_extra_tensors(tmp_path: Path) -> None:
    hf_model("llama-gqa").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # silently ignored
    tensors["model.extra.weight"] = torch.ones(2)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"ignoring 1 tensor\(s\).*model\.extra\.weight"):
        load_model(tmp_path)
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model\.norm\.weight has shape \[3\].*\[64\]"):
        load_model(tmp_path)


def test_no_weights_or_no_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_model(tmp_path)
    hf_model("llama-gqa").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"no \*\.safetensors files"):
        load_model(tmp_path)


def test_builtin_model_is_deterministic() -> None:
    model_a, tokenizer = builtin_model()
    model_b, _ = builtin_model()
    config = model_a.config
    assert config.spec.name == BUILTIN_NAME
    assert (config.vocab_size, config.spec.hidden_size, config.spec.num_layers) == (258, 256, 4)
    assert (config.spec.num_attention_heads, config.spec.num_kv_heads) == (8, 2)
    assert config.intermediate_size == 688 and not config.tie_word_embeddings
    ids = tokenizer.encode("kv cache")
    logits_a = step(model_a, new_store(model_a), [(ids, 0, TABLE_B)])
    logits_b = step(model_b, new_store(model_b), [(ids, 0, TABLE_B)])
    assert torch.equal(logits_a, logits_b)
    assert logits_a.shape == (len(ids), 258)
    assert model_a.model.norm.weight.eq(1).all()
    assert 0.015 < float(model_a.lm_head.weight.std()) < 0.025


def test_byte_tokenizer_round_trips() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("héllo wörld")
    assert ids[0] == 256 and len(ids) == 1 + len("héllo wörld".encode())
    assert tokenizer.decode([*ids, 257]) == "héllo wörld"
    assert tokenizer.decode([0xC3]) == "\ufffd"  # a truncated UTF-8 sequence
    assert tokenizer.eos_token_ids == frozenset({257}) and tokenizer.vocab_size == 258


def test_hf_tokenizer_adapter_matches_transformers(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "<s>", "</s>", "hello", "world", "kv", "cache"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 6]}))
    ours = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode("hello kv cache") == theirs.encode("hello kv cache") == [1, 3, 5, 6]
    assert ours.decode([1, 3, 4, 2]) == "hello world"
    assert ours.eos_token_ids == frozenset({2, 6})
    assert ours.vocab_size == len(words)


def test_load_tokenizer_without_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_packed_linear_weights_give_the_same_products_and_no_second_copy():
    from kvforge.models.linear import ONEDNN, Linear

    torch.manual_seed(0)
    layer = Linear(64, 96, bias=True)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    assert layer.pack_weight() == ONEDNN
    if ONEDNN:
        assert [n for n, _ in layer.named_parameters()] == ["bias"]  # the plain weight is gone
    for rows in (1, 5, 200):  # any row count, not only the one the packing is laid out for
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    assert not Linear(8, 8).to(torch.bfloat16).pack_weight()  # float32 only
