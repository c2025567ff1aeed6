"""The GGUF converter: metadata, tensor layout, the RoPE row permutation, and (when
llama-cpp-python is installed) llama.cpp's greedy tokens against transformers'."""

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

gguf = pytest.importorskip("gguf")

from kvforge.errors import ConfigError  # noqa: E402
from kvforge.models.gguf_export import export_gguf, placeholder_vocab  # noqa: E402
from kvforge.models.gguf_layout import rope_deinterleave, rope_interleave  # noqa: E402
from model_util import hf_greedy  # noqa: E402

TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=300,
    max_position_embeddings=256,
)
PROMPTS = ([1, 17, 250, 3, 99, 42, 7], [1, 260, 5, 5, 5, 128, 200, 33, 64, 11, 290])
NUM_NEW_TOKENS = 16
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # so most of the tiny model's channels are scaled
}
# name -> (family, config overrides) of the checkpoints llama.cpp is checked on
PARITY_CHECKPOINTS = {
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mistral": ("mistral", {}),
    "qwen2-bias": ("qwen2", {}),
}


def _save_tiny(directory: Path, family: str = "llama", **overrides) -> Path:
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    torch.manual_seed(0)
    model = model_class(config_class(**(TINY | overrides)))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("untied"), tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


def _read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def _hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    return load_file(directory / "model.safetensors")


def test_metadata_values(untied, tmp_path):
    fields, _ = _read(export_gguf(untied, tmp_path / "m.gguf"))
    expected = {
        "general.architecture": "llama",
        "general.name": untied.name,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        "llama.vocab_size": 300,
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16,
        "llama.attention.value_length": 16,
        "llama.rope.dimension_count": 16,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["llama.rope.freq_base"] == 10000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == len(fields["tokenizer.ggml.token_type"]) == 300
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert tokens[3 + 0x0A] == "<0x0A>"  # llama.cpp's SPM newline lookup


def test_rope_theta_from_either_config_format(tmp_path):
    directory = _save_tiny(tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 500000.0  # the transformers-4 spelling
    (directory / "config.json").write_text(json.dumps(config))
    fields, _ = _read(export_gguf(directory, tmp_path / "m.gguf"))
    assert fields["llama.rope.freq_base"] == 500000.0


@pytest.mark.parametrize("tie", [False, True])
def test_tensor_names_and_shapes(untied, tied, tmp_path, tie):
    directory = tied if tie else untied
    _, tensors = _read(export_gguf(directory, tmp_path / "m.gguf"))
    per_layer = {
        "attn_norm.weight": (64,),
        "attn_q.weight": (64, 64),
        "attn_k.weight": (32, 64),
        "attn_v.weight": (32, 64),
        "attn_output.weight": (64, 64),
        "ffn_norm.weight": (64,),
        "ffn_gate.weight": (128, 64),
        "ffn_up.weight": (128, 64),
        "ffn_down.weight": (64, 128),
    }
    expected = {"token_embd.weight": (300, 64), "output_norm.weight": (64,)}
    expected |= {f"blk.{i}.{k}": shape for i in range(2) for k, shape in per_layer.items()}
    if not tie:
        expected["output.weight"] = (300, 64)
    assert {name: t.data.shape for name, t in tensors.items()} == expected  # numpy row-major
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())


def test_weights_match_and_qk_unpermute_exactly(untied, tmp_path):
    _, tensors = _read(export_gguf(untied, tmp_path / "m.gguf"))
    hf = _hf_tensors(untied)
    for i in range(2):
        prefix = f"model.layers.{i}."
        q = rope_deinterleave(np.asarray(tensors[f"blk.{i}.attn_q.weight"].data), 4)
        k = rope_deinterleave(np.asarray(tensors[f"blk.{i}.attn_k.weight"].data), 2)
        np.testing.assert_array_equal(q, hf[prefix + "self_attn.q_proj.weight"])
        np.testing.assert_array_equal(k, hf[prefix + "self_attn.k_proj.weight"])
        v = tensors[f"blk.{i}.attn_v.weight"].data
        np.testing.assert_array_equal(v, hf[prefix + "self_attn.v_proj.weight"])
    np.testing.assert_array_equal(tensors["output.weight"].data, hf["lm_head.weight"])


def test_interleaved_rope_on_permuted_rows_equals_rotate_half():
    """The permutation is right iff llama.cpp's RoPE (pairs 2i, 2i+1) on the
    permuted projection gives the permuted result of HF's RoPE (pairs i, i+d/2)."""
    rng = np.random.default_rng(0)
    num_heads, head_dim, hidden, position = 3, 8, 10, 37
    weight = rng.standard_normal((num_heads * head_dim, hidden))
    x = rng.standard_normal(hidden)
    angle = position * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)  # [D/2]
    cos, sin = np.cos(angle), np.sin(angle)

    q = (weight @ x).reshape(num_heads, head_dim)
    first, second = q[:, : head_dim // 2], q[:, head_dim // 2 :]
    hf = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=1)

    q = (rope_interleave(weight, num_heads) @ x).reshape(num_heads, head_dim)
    even, odd = q[:, 0::2], q[:, 1::2]
    llama_cpp = np.stack([even * cos - odd * sin, odd * cos + even * sin], axis=2)

    expected = rope_interleave(hf.reshape(-1), num_heads).reshape(num_heads, head_dim)
    np.testing.assert_allclose(llama_cpp.reshape(num_heads, head_dim), expected, rtol=1e-12)


def test_f16_keeps_vectors_in_f32(untied, tmp_path):
    fields, tensors = _read(export_gguf(untied, tmp_path / "m.gguf", dtype="f16"))
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    f16, f32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    for name, tensor in tensors.items():
        assert tensor.tensor_type == (f16 if tensor.data.ndim == 2 else f32), name


def test_qwen2_is_written_as_qwen2_without_permuting_its_rows(tmp_path):
    """llama.cpp's qwen2 graph rotates halves as transformers does: rows keep HF's order."""
    directory = _save_tiny(tmp_path / "qwen2", family="qwen2")
    fields, tensors = _read(export_gguf(directory, tmp_path / "m.gguf"))
    assert fields["general.architecture"] == "qwen2"
    assert fields["qwen2.attention.head_count_kv"] == 2
    hf = _hf_tensors(directory)
    for name in ("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias"):
        kind = "q_proj" if "attn_q" in name else "k_proj"
        suffix = name.split(".")[1]
        np.testing.assert_array_equal(
            tensors[f"blk.0.{name}"].data, hf[f"model.layers.0.self_attn.{kind}.{suffix}"]
        )
    assert tensors["blk.0.attn_v.bias"].data.shape == (32,)


def test_quantized_matrices_round_trip_within_the_types_step(untied, tmp_path):
    """q8_0: every 2-D weight is Q8_0 (vectors stay F32) and dequantizes to within half a
    step (1/127 of each 32-value block's largest magnitude) of the original, plus what
    storing the step in fp16 costs (up to 127 steps x 2^-11)."""
    _, tensors = _read(export_gguf(untied, tmp_path / "m.gguf", dtype="q8_0"))
    hf = _hf_tensors(untied)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, tensor in tensors.items():
        expected_type = q8 if len(tensor.shape) == 2 else gguf.GGMLQuantizationType.F32
        assert tensor.tensor_type == expected_type, name
    weights = gguf.quants.dequantize(tensors["blk.0.attn_v.weight"].data, q8)
    original = hf["model.layers.0.self_attn.v_proj.weight"]
    step = np.abs(original.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    bound = step * (0.5 + 127 * 2**-11) + 1e-7
    assert np.all(np.abs(weights.reshape(-1, 32) - original.reshape(-1, 32)) <= bound)


def test_placeholder_vocab_puts_special_tokens_at_config_ids():
    tokens, scores, types = placeholder_vocab(400, bos_token_id=300, eos_token_id=301)
    assert (tokens[300], tokens[301], tokens[0], tokens[1]) == ("<s>", "</s>", "<unk>", "<0x00>")
    assert types[300] == types[301] == gguf.TokenType.CONTROL
    assert types.count(gguf.TokenType.BYTE) == 256
    assert len(set(tokens)) == len(tokens) == len(scores) == 400


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "supported: LlamaForCausalLM"),
        ({"vocab_size": 100}, "placeholder vocabulary"),
    ],
)
def test_unsupported_checkpoints_raise_config_error(tmp_path, edit, message):
    directory = _save_tiny(
        tmp_path / "ckpt", **({"vocab_size": 100} if "vocab_size" in edit else {})
    )
    config = json.loads((directory / "config.json").read_text()) | edit
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        export_gguf(directory, tmp_path / "m.gguf")


def test_a_tensor_llama_cpp_would_ignore_raises_config_error(tmp_path):
    directory = _save_tiny(tmp_path / "ckpt")
    tensors = _hf_tensors(directory)
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, dtype=np.float32)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="q_norm"):
        export_gguf(directory, tmp_path / "m.gguf")


def test_unknown_dtype_raises_config_error(untied, tmp_path):
    with pytest.raises(ConfigError, match="f32, f16"):
        export_gguf(untied, tmp_path / "m.gguf", dtype="q4_k")


def test_llama3_rope_scaling_writes_frequency_divisors(tmp_path):
    directory = _save_tiny(tmp_path / "ckpt", rope_parameters=LLAMA3_ROPE)
    _, tensors = _read(export_gguf(directory, tmp_path / "m.gguf"))
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    assert factors.shape == (8,)  # one per channel pair of a 16-wide head
    assert factors[0] == 1.0  # the highest frequency is kept
    assert factors[-1] == pytest.approx(8.0)  # the lowest is divided by `factor`


@pytest.mark.parametrize("checkpoint", PARITY_CHECKPOINTS)
def test_llama_cpp_greedy_tokens_match_transformers(tmp_path, checkpoint):
    pytest.importorskip("llama_cpp")
    import transformers

    from kvforge.bench.llamacpp import LlamaCppEngine

    family, overrides = PARITY_CHECKPOINTS[checkpoint]
    directory = _save_tiny(tmp_path / checkpoint, family, **overrides)
    engine = LlamaCppEngine(export_gguf(directory, tmp_path / "m.gguf"), n_ctx=64, n_threads=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    for prompt in PROMPTS:
        expected = hf_greedy(model, prompt, NUM_NEW_TOKENS)
        calls: list[int] = []
        assert engine.generate_greedy(prompt, NUM_NEW_TOKENS, partial(calls.append, 1)) == expected
        assert len(calls) == NUM_NEW_TOKENS  # one call per token, for per-token timing
    engine.close()
