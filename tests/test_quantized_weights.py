"""Weights kept quantized: GGUF blocks taken as they are, the int4/int8 CPU kernels
against the dequantized matmul, and whole models (GGUF and HF) served that way."""

import gguf
import numpy as np
import pytest
import torch

from kvforge import LLM, SamplingParams, kernels
from kvforge.errors import KVForgeError
from kvforge.models.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from kvforge.planner import resolve_weights
from model_util import prefill_logits

Q = gguf.GGMLQuantizationType


def packed_bytes(model) -> int:
    """Bytes of a model's quantized weights, each counted once (a tied head shares one)."""
    weights = {id(m.qweight): m.qweight for m in model.modules() if hasattr(m, "qweight")}
    return sum(w.nbytes for w in weights.values())


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantize_as_gguf_does(type_name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 96)).astype(np.float32)
    blocks = gguf.quants.quantize(w, Q[type_name])
    ours = QuantizedWeight.from_gguf(type_name, blocks)
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, Q[type_name]))
    assert ours.format == ("int8" if type_name == "Q8_0" else "int4")
    assert torch.equal(ours.dequantize(), expected)
    assert ours.nbytes == blocks.nbytes + (24 * 3 * 2 if type_name == "Q4_0" else 0)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 65])
def test_the_matmul_equals_the_dequantized_one(fmt, rows):
    gen = torch.Generator().manual_seed(rows)
    weight = QuantizedWeight.quantize(torch.randn(37, 160, generator=gen), fmt)
    x = torch.randn(rows, 160, generator=gen)
    expected = x @ weight.dequantize().T
    # few rows: x rounded to 15 bits a row (3e-5 of its largest value); many: float32 GEMM
    error = (weight.matmul(x) - expected).abs().max() / expected.abs().max()
    assert error.item() < (1e-4 if rows <= 64 else 1e-6)


def test_quantizing_keeps_each_group_within_half_a_step():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=gen)
    for fmt, levels in (("int4", 15), ("int8", 254)):
        q = QuantizedWeight.quantize(w, fmt)
        groups = w.view(8, 2, 32)
        step = (groups.amax(-1) - groups.amin(-1)) / levels
        if fmt == "int8":
            step = groups.abs().amax(-1) * 2 / levels
        error = (q.dequantize() - w).abs().view(8, 2, 32).amax(-1)
        assert bool((error <= step * 0.51 + 1e-3).all()), fmt


def test_the_kernels_build_here_or_say_why_not():
    ops, why = kernels.cpu(), kernels.reason()
    assert (ops is None) == (why is not None)
    if ops is not None:
        with pytest.raises(RuntimeError, match="columns"):
            ops.q8_linear(torch.zeros(1, 64), torch.zeros(2, 32, dtype=torch.int8),
                          torch.zeros(2, 1, dtype=torch.float16))  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_dense():
    return LLM(model="smollm2-135m-instruct", device="cpu", kv_memory="64MiB",
               weights_dtype="fp32")  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_packed():
    return LLM(model="smollm2-135m-instruct", device="cpu", kv_memory="64MiB")


def test_smollm2_keeps_its_file_blocks(smollm2_packed):
    from kvforge.models import catalog

    model = smollm2_packed.engine.runner.model
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantizedLinear)
    assert layer.self_attn.qkv_proj.qweight.format == "int4"
    assert isinstance(layer.mlp.gate_up_proj, QuantizedLinear)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight  # tied, int8
    # the file's Q4_1 and Q8_0 bytes, held as they are
    reader = gguf.GGUFReader(catalog.smollm2_path())
    file_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name != "F32")
    assert packed_bytes(model) == file_bytes


def test_smollm2_packed_logits_equal_the_dequantized_ones(smollm2_dense, smollm2_packed):
    ids = smollm2_dense.tokenizer.encode("The KV cache holds the keys and values of every token.")
    dense = prefill_logits(smollm2_dense, ids)
    packed = prefill_logits(smollm2_packed, ids)
    assert ((packed - dense).abs().max() / dense.abs().max()).item() < 1e-3
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    out = [llm.generate([ids], params)[0].token_ids for llm in (smollm2_dense, smollm2_packed)]
    assert out[0] == out[1]


def test_an_hf_checkpoint_quantized_at_load(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=200, max_position_embeddings=256,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    ids = [5, 17, 42, 9, 100, 3, 77, 150]
    dense = prefill_logits(LLM(model=str(tmp_path), device="cpu", num_blocks=16), ids)
    for fmt, tolerance in (("int8", 0.02), ("int4", 0.3)):
        llm = LLM(model=str(tmp_path), device="cpu", num_blocks=16, weights_dtype=fmt)
        model = llm.engine.runner.model
        assert model.model.layers[1].mlp.down_proj.qweight.format == fmt
        assert model.lm_head.qweight.format == "int8"  # the head stays 8-bit under int4
        logits = prefill_logits(llm, ids)
        assert ((logits - dense).abs().max() / dense.abs().max()).item() < tolerance
        # what the planner counts for these weights is what the model holds
        held = packed_bytes(model) + sum(p.numel() * p.element_size() for p in model.parameters())
        spec = model.config.spec
        assert resolve_weights(spec, weights_dtype=fmt).num_bytes == held


def test_weights_dtype_errors_name_the_choices():
    with pytest.raises(KVForgeError, match=r"weights_dtype must be one of auto, fp32, .*int4"):
        LLM(model="random", device="cpu", weights_dtype="int3")
    with pytest.raises(KVForgeError, match="weights_dtype 'bf16' and dtype 'fp32' disagree"):
        LLM(model="random", device="cpu", weights_dtype="bf16", dtype="fp32")


def test_without_the_kernels_auto_serves_dense_weights(monkeypatch):
    """Where the kernels cannot run, a per-call dequantization would be slower than dense
    weights: "auto" dequantizes the file at load; an explicit int4 stays packed and gives
    the dequantized matmul's results."""
    monkeypatch.setattr(kernels, "cpu", lambda: None)
    llm = LLM(model="smollm2-135m-instruct", device="cpu", kv_memory="16MiB")
    assert not any(isinstance(m, QuantizedLinear) for m in llm.engine.runner.model.modules())
    weight = QuantizedWeight.quantize(torch.randn(8, 64, generator=torch.Generator()), "int4")
    x = torch.randn(2, 64, generator=torch.Generator())
    assert torch.equal(weight.matmul(x), x @ weight.dequantize().T)
