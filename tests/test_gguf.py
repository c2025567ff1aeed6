"""GGUF files: kvforge's reader against transformers' reading the same file.

Random-init checkpoints of each supported architecture and shape are written by
kvforge's exporter (F32, F16, BF16, Q8_0, Q5_x, Q4_x), and K-quant files are
made of valid random blocks (gguf cannot write K-quants). kvforge and
transformers load the same file: their logits and greedy tokens must agree.
Every bad file gets one ConfigError line naming the problem.
"""

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from kvforge import LLM, SamplingParams
from kvforge.cli import main
from kvforge.errors import ConfigError
from kvforge.models.gguf_export import export_gguf
from kvforge.models.gguf_file import read_gguf
from kvforge.models.gguf_layout import rope_interleave
from kvforge.models.loader import load_model
from model_util import hf_greedy, prefill_logits

TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=320,
    max_position_embeddings=256,
)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
# name -> (family, config overrides, exported dtype)
CASES = {
    "llama-untied-f32": ("llama", {}, "f32"),
    "llama-tied-q8_0": ("llama", {"tie_word_embeddings": True}, "q8_0"),
    "llama-mqa-head_dim32-f16": ("llama", {"num_key_value_heads": 1, "head_dim": 32}, "f16"),
    "llama-bf16": ("llama", {}, "bf16"),
    "llama-q5_0": ("llama", {}, "q5_0"),
    "llama-q5_1": ("llama", {}, "q5_1"),
    "llama-q4_1": ("llama", {}, "q4_1"),
    "qwen2-bias-q8_0": ("qwen2", {}, "q8_0"),
    # transformers reads no head_dim from qwen3 files, so the test uses its default (128)
    "qwen3-qk_norm-q4_0": ("qwen3", {"head_dim": 128}, "q4_0"),
}
PROMPTS = ([1, 17, 250, 3, 99, 42, 7], [1, 260, 5, 5, 5, 128, 200, 33, 64, 11, 290, 301])
NEW_TOKENS = 12
# K-quant type -> (byte offsets of the fp16 scales in a block, the largest |sub-scale x code|
# a value can reach): scales are drawn so that weights stay within ~0.1, as in a real model
K_QUANTS = {
    "Q2_K": ((80, 82), 15 * 3),
    "Q3_K": ((108,), 32 * 4),
    "Q4_K": ((0, 2), 63 * 15),
    "Q5_K": ((0, 2), 63 * 31),
    "Q6_K": ((208,), 128 * 32),
}
WEIGHT_MAGNITUDE = 0.1


def save_checkpoint(directory: Path, family: str, **overrides) -> Path:
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    # weights 10x transformers' default spread, so that greedy tokens vary
    model = model_class(config_class(**(TINY | {"initializer_range": 0.2} | overrides)))
    with torch.no_grad():  # HF zeroes biases and sets norms to 1: a misplaced one must show
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


def hf_from_gguf(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def assert_same_model(llm: LLM, reference: transformers.PreTrainedModel) -> None:
    """Prefill logits within 1e-4 (absolute and relative), greedy tokens equal, batched."""
    for ids in PROMPTS:
        torch.testing.assert_close(
            prefill_logits(llm, ids), hf_logits(reference, ids), atol=1e-4, rtol=1e-4
        )
    outs = llm.generate(list(PROMPTS), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    for ids, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == hf_greedy(reference, ids, NEW_TOKENS)


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory) -> tuple[str, Path]:
    family, overrides, dtype = CASES[request.param]
    directory = save_checkpoint(tmp_path_factory.mktemp(request.param), family, **overrides)
    return request.param, export_gguf(directory, directory / f"model-{dtype}.gguf", dtype)


def test_exported_files_equal_transformers_reading_them(exported):
    name, path = exported
    llm = LLM(model=str(path), device="cpu", kv_memory="8MiB", weights_dtype="fp32")
    assert_same_model(llm, hf_from_gguf(path))
    family, overrides, dtype = CASES[name]
    info = read_gguf(path)
    assert info.architecture == family and info.file_type == dtype.upper()
    spec = llm.engine.runner.model.config.spec
    assert spec.head_dim == overrides.get("head_dim", 16)
    assert spec.num_kv_heads == overrides.get("num_key_value_heads", 2)
    assert spec.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    assert spec.qkv_bias == (family == "qwen2") and spec.qk_norm == (family == "qwen3")
    assert spec.dtype == "fp32"  # dequantized at load on a CPU


def test_llama3_rope_file_equals_the_checkpoint(tmp_path):
    """Llama 3.1's RoPE scaling travels as per-pair divisors (`rope_freqs`); transformers'
    GGUF reader ignores them, so the oracle is the checkpoint the file was made from."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    directory = save_checkpoint(tmp_path / "llama3", "llama", rope_parameters=rope)
    path = export_gguf(directory, tmp_path / "llama3.gguf")
    llm = LLM(model=str(path), device="cpu", kv_memory="8MiB", weights_dtype="fp32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    long_prompt = [(7 * i + 3) % 320 for i in range(200)]  # past the scaled wavelengths
    torch.testing.assert_close(
        prefill_logits(llm, long_prompt), hf_logits(reference, long_prompt), atol=1e-4, rtol=1e-4
    )
    assert_same_model(llm, reference)


def rewrite(src: Path, dst: Path, change_tensor=None, fields: dict | None = None) -> Path:
    """Copy a GGUF file, letting `change_tensor(name, array)` return (array, raw type) or
    None (drop it) for each tensor, and `fields` override metadata values. A new
    `general.architecture` renames the keys under the old one."""
    reader = gguf.GGUFReader(src)
    fields = fields or {}
    old_arch = reader.fields["general.architecture"].contents()
    arch = fields.get("general.architecture", old_arch)
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        name = f"{arch}.{key.removeprefix(old_arch + '.')}" if key.startswith(old_arch) else key
        writer.add_key_value(name, fields.get(key, field.contents()), field.types[0], sub_type)
    for t in reader.tensors:
        array, raw = np.asarray(t.data), None
        if change_tensor is not None:
            changed = change_tensor(t.name, array)
            if changed is None:
                continue
            array, raw = changed
        writer.add_tensor(t.name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def random_blocks(rows: int, cols: int, qtype: gguf.GGMLQuantizationType, rng) -> np.ndarray:
    """Valid random blocks: random bits, with every fp16 scale a small finite number."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    offsets, largest_code = K_QUANTS[qtype.name]
    for offset in offsets:
        d = rng.uniform(0.5, 1.0, blocks.shape[:2]) * WEIGHT_MAGNITUDE / largest_code
        scales = d.astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(*scales.shape, 2)
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="module")
def wide_f32(tmp_path_factory) -> Path:
    """A tiny llama whose rows are 256 wide: K-quant blocks hold 256 values."""
    directory = save_checkpoint(
        tmp_path_factory.mktemp("wide"), "llama", hidden_size=256, intermediate_size=512,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return export_gguf(directory, directory / "wide-f32.gguf")


@pytest.mark.parametrize("type_name", list(K_QUANTS))
def test_k_quant_files_equal_transformers_reading_them(wide_f32, tmp_path, type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(list(K_QUANTS).index(type_name))

    def quantize(name: str, array: np.ndarray):
        if array.ndim != 2:
            return array, None
        return random_blocks(*array.shape, qtype, rng), qtype

    path = rewrite(wide_f32, tmp_path / f"wide-{type_name}.gguf", quantize)
    reference = hf_from_gguf(path)
    llm = LLM(model=str(path), device="cpu", kv_memory="8MiB", weights_dtype="fp32")
    info = read_gguf(path)
    assert info.tensors["blk.0.attn_q.weight"].type_name == type_name
    # the same dequantized bits: the embedding (read by lookup, never packed) is equal
    ours = llm.engine.runner.model.model.embed_tokens.weight
    assert torch.equal(ours, reference.model.embed_tokens.weight)
    assert_same_model(llm, reference)


def test_a_llama_file_with_qkv_biases_and_no_output_bias_runs(tmp_path):
    """A "llamafied" Qwen2: arch llama (q/k rows interleaved), q/k/v biases, no o bias."""
    directory = save_checkpoint(tmp_path / "qwen2", "qwen2")
    qwen2 = export_gguf(directory, tmp_path / "qwen2.gguf")

    def interleave(name: str, array: np.ndarray):
        heads = {"attn_q": 4, "attn_k": 2}.get(name.split(".")[-2])
        return (array if heads is None else rope_interleave(array, heads)), None

    path = rewrite(qwen2, tmp_path / "llamafied.gguf", interleave,
                   fields={"general.architecture": "llama"})  # fmt: skip
    assert read_gguf(path).architecture == "llama"
    llm = LLM(model=str(path), device="cpu", kv_memory="8MiB", weights_dtype="fp32")
    spec = llm.engine.runner.model.config.spec
    assert spec.qkv_bias and not spec.o_bias
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert_same_model(llm, reference)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_llama3_rope_divisors_are_read_in_float32(tmp_path, dtype):
    """The divisors set every angle: bf16 (the default on CUDA) would move them."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    directory = save_checkpoint(tmp_path / "llama3", "llama", rope_parameters=rope)
    path = export_gguf(directory, tmp_path / "llama3.gguf")
    stored = gguf.GGUFReader(path).get_tensor(0)
    assert stored.name == "rope_freqs.weight"
    model = load_model(path, dtype=dtype)
    assert model.config.rope_freq_divisors == tuple(np.asarray(stored.data).tolist())
    assert model.config.rope_freq_divisors[-1] == pytest.approx(8.0)


# --- bad files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_f32(tmp_path_factory) -> Path:
    directory = save_checkpoint(tmp_path_factory.mktemp("small"), "llama")
    return export_gguf(directory, directory / "small-f32.gguf")


def bad_files(small: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say)."""
    data = small.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])
    header_only = tmp_path / "header-only.gguf"
    header_only.write_bytes(data[:500])
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    iq4 = gguf.GGMLQuantizationType.IQ4_NL

    def to_iq4(name, array):
        if name != "blk.0.ffn_up.weight":
            return array, None
        block_size, type_size = gguf.GGML_QUANT_SIZES[iq4]
        return np.zeros((array.shape[0], array.shape[1] // block_size * type_size),
                        dtype=np.uint8), iq4  # fmt: skip

    return {
        "truncated": (truncated, "truncated or corrupt GGUF file"),
        "header-only": (header_only, "truncated or corrupt GGUF file"),
        "not-gguf": (text, "not a GGUF file (it does not start with the GGUF magic)"),
        "architecture": (
            rewrite(small, tmp_path / "phi3.gguf", fields={"general.architecture": "phi3"}),
            "GGUF architecture 'phi3' is not supported; supported: llama, qwen2, qwen3",
        ),
        "tensor-type": (
            rewrite(small, tmp_path / "iq4.gguf", to_iq4),
            "tensor blk.0.ffn_up.weight has type IQ4_NL, which kvforge cannot read; "
            "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K",
        ),
        "missing-tensor": (
            rewrite(small, tmp_path / "missing.gguf", _drop_ffn_up),
            "the GGUF file lacks tensor(s) blk.1.ffn_up.weight",
        ),
    }


def _drop_ffn_up(name: str, array: np.ndarray):
    return None if name == "blk.1.ffn_up.weight" else (array, None)


BAD = ("truncated", "header-only", "not-gguf", "architecture", "tensor-type", "missing-tensor")


@pytest.mark.parametrize("bad", BAD)
def test_bad_files_get_one_line_naming_the_problem(small_f32, tmp_path, capsys, bad):
    path, message = bad_files(small_f32, tmp_path)[bad]
    with pytest.raises(ConfigError) as error:
        LLM(model=str(path), device="cpu", kv_memory="8MiB", weights_dtype="fp32")
    assert message in str(error.value) and str(path) in str(error.value)
    commands = [["generate", "--prompt", "x"], ["plan"], ["eval", "perplexity"],
                ["bench", "memory", "--quick"]]  # fmt: skip
    if bad == "missing-tensor":
        commands = commands[:1] + commands[2:]  # plan reads the header only: it can plan this
    for command in commands:
        assert main([*command, "--model", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, command


def test_a_bad_file_on_the_command_line_exits_2_without_a_traceback(small_f32, tmp_path):
    import subprocess

    path, message = bad_files(small_f32, tmp_path)["truncated"]
    result = subprocess.run(
        [sys.executable, "-m", "kvforge", "generate", "--model", str(path), "--prompt", "x"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().startswith("kvforge generate: error: ")
    assert message in result.stderr and "Traceback" not in result.stderr


def test_plan_reads_the_shape_and_bytes_from_the_header(small_f32, capsys):
    import json

    assert main(["plan", "--model", str(small_f32), "--context", "100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["source"] == "gguf"
    assert (plan["num_layers"], plan["num_kv_heads"], plan["head_dim"]) == (2, 2, 16)
    # fp32 KV: 2 (K and V) x 2 layers x 2 heads x 16 x 4 B
    assert plan["bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    info = read_gguf(small_f32)
    assert info.num_params == sum(p.numel() for p in hf_from_gguf(small_f32).parameters())
