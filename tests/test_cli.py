"""`kvforge plan` end to end: exact JSON, readable tables, and every user error → exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvforge.cli import main
from kvforge.kvcache.formats import KV_FORMATS
from kvforge.presets import PRESETS

GiB = 2**30


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors and --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys, *args: str) -> dict:
    code, out, err = run(capsys, "plan", *args, "--json")
    assert (code, err) == (0, "")
    return json.loads(out)


def test_done_criterion_as_a_user_runs_it():
    """The console script and `python -m kvforge` print the seed's figures."""
    args = ["plan", "--model", "llama-2-7b", "--context", "4096", "--kv-dtype", "fp16", "--json"]
    script = Path(sys.executable).parent / "kvforge"
    for command in ([str(script)], [sys.executable, "-m", "kvforge"]):
        result = subprocess.run([*command, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        assert '"bytes_per_token": 524288' in result.stdout
        assert '"bytes_per_request": 2147483648' in result.stdout


def test_json_has_the_promised_fields(capsys):
    data = plan_json(capsys, "--model", "llama-3-70b", "--context", "8192")
    assert data["source"] == "preset"
    assert data["bytes_per_token"] == 327_680
    assert data["bytes_per_request"] == 2_684_354_560
    assert data["kv_bytes_total"] == 2_684_354_560  # no budget: the batch's cache
    assert data["weights_bytes"] == 70_553_706_496 * 2
    assert data["gqa_saving_factor"] == 8
    assert data["max_concurrent_requests"] is None
    assert data["max_context_single_request"] is None
    # 141 GB of bf16 weights leave nothing in 80 GiB; int4 weights do fit
    data = plan_json(
        capsys, "--model", "llama-3-70b", "--context", "8192", "--memory", "80GiB",
        "--weights-dtype", "int4",
    )  # fmt: skip
    # 68,451,041,280 matmul weights at 5 bits, the two 128256 x 8192 tables at int8's 8.5,
    # 1,318,912 norm weights in bf16: what kvforge's loader would hold
    weights = (68_451_041_280 * 5 + 2_101_346_304 * 17 // 2) // 8 + 1_318_912 * 2
    pool = 80 * GiB - weights
    assert data["weights_bytes"] == weights == 45_017_219_072
    assert data["kv_bytes_total"] == pool
    assert data["max_concurrent_requests"] == pool // 2_684_354_560 == 15
    assert data["max_context_single_request"] == 8192
    assert data["kv_capacity_tokens"] == pool // (16 * 327_680) * 16


def test_json_with_compare(capsys):
    data = plan_json(
        capsys, "--model", "llama-3.1-8b", "--context", "8192", "--memory", "24GiB", "--compare"
    )
    assert [r["attention"] for r in data["compare"]["attention"]] == ["MHA", "GQA", "MQA"]
    assert len(data["compare"]["kv_dtypes"]) == 7
    assert [r["context"] for r in data["compare"]["contexts"]] == [1024, 4096, 8192, 32768, 131072]


def test_readable_table(capsys):
    code, out, err = run(
        capsys,
        "plan",
        "--model",
        "llama-2-7b",
        "--context",
        "4096",
        "--memory",
        "16GiB",
        "--compare",
    )
    assert (code, err) == (0, "")
    assert "2 × 32 layers × 32 KV heads × 128 head_dim × 2 B = 524,288 B (512.00 KiB)" in out
    assert "4,096 tokens → 256 blocks = 2,147,483,648 B (2.00 GiB)" in out
    assert "6.74B parameters at fp16 = 13,476,831,232 B (12.55 GiB)" in out
    assert "1 concurrent request of 4,096 tokens; one request up to 4,096 tokens" in out
    assert "Attention layout (fp16, 4,096-token requests):" in out
    assert "MHA (this model)" in out
    assert "8,192 (> model max)" in out


def test_sliding_window_table(capsys):
    code, out, _ = run(capsys, "plan", "--model", "mistral-7b", "--context", "32768")
    assert code == 0
    assert "sliding window 4,096" in out
    assert "32,768 tokens (window keeps 4,096) → 257 blocks" in out


def test_list_presets(capsys):
    code, out, _ = run(capsys, "plan", "--list-presets")
    assert code == 0
    for name in PRESETS:
        assert name in out
    data = json.loads(run(capsys, "plan", "--list-presets", "--json")[1])
    assert data[0]["name"] == "llama-2-7b" and data[0]["num_params"] == 6_738_415_616


def test_config_file_with_params(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "falcon",
                "num_hidden_layers": 32,
                "num_attention_heads": 71,
                "num_key_value_heads": 1,
                "hidden_size": 4544,
                "max_position_embeddings": 2048,
                "torch_dtype": "bfloat16",
            }
        )
    )
    data = plan_json(capsys, "--model", str(config), "--memory", "24GiB", "--params", "7B")
    assert data["source"] == "config"
    assert data["attention"] == "MQA"
    assert data["bytes_per_token"] == 2 * 32 * 1 * 64 * 2
    assert data["weights_bytes"] == 14 * 10**9
    assert data["kv_bytes_total"] == 24 * GiB - 14 * 10**9


def test_help_for_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "plan" in out
    code, out, _ = run(capsys, "plan", "--help")
    assert code == 0 and "--kv-dtype" in out and "--compare" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "llama-9"], "unknown model 'llama-9': not a GGUF file, a config.json, a "
                                 "checkpoint directory or one of smollm2-135m-instruct, "
                                 "kvforge-mini, random; presets: llama-2-7b, llama-2-13b"),
        (["--model", "./no/such/config.json"],
         "no such GGUF file, config file or checkpoint directory"),
        (["--model", "llama-2-7b", "--memory", "8GiB"],
         "weights (13,476,831,232 B at fp16) plus reserve (0 B) need more than the memory budget"),
        (["--model", "llama-2-7b", "--memory", "20GiB", "--reserve", "8GiB"],
         "plus reserve (8,589,934,592 B) need more than the memory budget"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line_exit_2(capsys, args, message):
    code, out, err = run(capsys, "plan", *args)
    assert code == 2
    assert out == ""
    assert err.startswith("kvforge plan: error: ")
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--context", "0"], "argument --context: must be a positive whole number, got 0"),
        (["--context", "-5"], "argument --context: must be a positive whole number, got -5"),
        (["--batch", "two"], "argument --batch: 'two' is not a whole number"),
        (["--block-size", "0"], "argument --block-size: must be a positive whole number, got 0"),
        (["--memory", "lots"], "argument --memory: cannot read 'lots' as a memory size"),
        (["--memory", "0GiB"], "argument --memory: memory size '0GiB' must be at least 1 byte"),
        (["--kv-dtype", "int3"], "argument --kv-dtype: invalid choice: 'int3'"),
        (["--weights-dtype", "int2"], "argument --weights-dtype: invalid choice: 'int2'"),
        (["--params", "many"], "argument --params: cannot read 'many' as a count"),
    ],
)
def test_bad_flags_are_usage_errors(capsys, args, message):
    code, out, err = run(capsys, "plan", "--model", "llama-2-7b", *args)
    assert code == 2
    assert out == ""
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a config must be a JSON object, got list"),
        ('{"num_attention_heads": 8, "hidden_size": 64, "max_position_embeddings": 64}',
         "missing required field 'num_hidden_layers'"),
        ('{"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 3, '
         '"hidden_size": 64, "max_position_embeddings": 64}', "must be a multiple of"),
        ('{"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 64, '
         '"max_position_embeddings": 64, "torch_dtype": "float64"}', "unknown dtype 'float64'"),
        ('{"model_type": "falcon", "num_hidden_layers": 2, "num_attention_heads": 8, '
         '"hidden_size": 64, "max_position_embeddings": 64}',
         "cannot count the parameters of cfg (architecture 'falcon') from its config: "
         "give --params or a checkpoint directory"),
    ],
)  # fmt: skip
def test_bad_config_files(capsys, tmp_path, content, message):
    path = tmp_path / "cfg" / "config.json"
    path.parent.mkdir()
    path.write_text(content)
    code, out, err = run(capsys, "plan", "--model", str(path), "--memory", "1GiB")
    assert (code, out) == (2, "")
    assert err.startswith("kvforge plan: error: ") and message in err


def test_bad_checkpoint_directory(capsys, tmp_path):
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 64, '
        '"max_position_embeddings": 64}'
    )
    (tmp_path / "model.safetensors").write_bytes(b"\x05")
    code, _, err = run(capsys, "plan", "--model", str(tmp_path))
    assert code == 2 and "too short to be a safetensors file" in err


def test_user_error_in_a_real_process_has_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "kvforge", "plan", "--model", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("kvforge plan: error: unknown model 'nope'")
    assert "Traceback" not in result.stderr


def test_render_table_alignment():
    from kvforge.report import render_table

    table = render_table(["name", "n", "note"], [("a", 1, "x"), ("bbb", 22, None)], align="lrl")
    assert table.splitlines() == [
        "name   n  note",
        "----  --  ----",
        "a      1  x",
        "bbb   22  -",
    ]


def test_no_command_and_version(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "the following arguments are required: COMMAND" in err
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("kvforge 0.1.0")


def test_checkpoint_directory_plan(capsys, tmp_path):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        hidden_size=64,
        intermediate_size=96,
        vocab_size=128,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    capsys.readouterr()  # transformers' own progress bar
    params = sum(p.numel() for p in model.parameters())
    data = plan_json(capsys, "--model", str(tmp_path), "--context", "100", "--memory", "1MiB")
    assert data["source"] == "checkpoint"
    assert (data["num_params"], data["weights_bytes"], data["weights_dtype"]) == (
        params,
        params * 2,
        "bf16",
    )
    assert data["bytes_per_token"] == 2 * 2 * 1 * 16 * 2
    assert data["kv_bytes_total"] == 2**20 - params * 2
    # --params replaces the checkpoint's count; --weights-dtype its precision
    data = plan_json(
        capsys, "--model", str(tmp_path), "--params", "1000", "--weights-dtype", "fp32"
    )
    assert (data["num_params"], data["weights_bytes"]) == (1000, 4000)
    data = plan_json(capsys, "--model", str(tmp_path), "--weights-dtype", "int8")
    # int8 as kvforge holds it: 8.5 bits (an fp16 scale per 32) for the matmul weights
    # and tables, the 5 x 64 norm weights in the checkpoint's bf16
    assert data["weights_bytes"] == (params - 320) * 17 // 16 + 320 * 2 == 78_976


def test_plan_without_model_plans_the_default_model_from_its_file(capsys):
    code, out, err = run(capsys, "plan", "--context", "1000", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["source"] == "gguf" and plan["model"] == "smollm2-135m-instruct"
    assert plan["bytes_per_token"] == 2 * 30 * 3 * 64 * 4  # fp32, as served on a CPU
    assert plan["num_params"] == 134_515_008  # the file's tensors, embeddings tied


@pytest.mark.parametrize("kv_dtype", list(KV_FORMATS))
@pytest.mark.parametrize(("kv_memory", "max_num_seqs"), [("8MiB", 4), ("3MiB", 256)])
@pytest.mark.parametrize("skip_layers", [[], [0, 3]], ids=["all", "skip0,3"])
def test_plan_capacity_equals_what_the_engine_allocates(capsys, kv_dtype, kv_memory, max_num_seqs,
                                                        skip_layers):  # fmt: skip
    """The planner sizes the pool for plan and engine alike, int2's recent windows and the
    layers kept in the model's dtype (kv_skip_layers) included."""
    from kvforge import LLM

    code, out, err = run(capsys, "plan", "--model", "random", "--kv-dtype", kv_dtype,
                         "--kv-memory", kv_memory, "--max-num-seqs", str(max_num_seqs),
                         "--context", "512", "--json",
                         f"--kv-skip-layers={','.join(map(str, skip_layers))}")  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    assert plan["kv_skip_layers"] == skip_layers
    llm = LLM(model="random", device="cpu", kv_dtype=kv_dtype, kv_memory=kv_memory,
              max_num_seqs=max_num_seqs, kv_skip_layers=skip_layers)  # fmt: skip
    stats = llm.kv_stats()
    assert plan["kv_capacity_blocks"] == stats["blocks_total"]
    assert plan["kv_capacity_tokens"] == stats["blocks_total"] * stats["block_size"]
    assert plan["block_size"] == stats["block_size"]
    assert plan["bytes_per_block"] * plan["kv_capacity_blocks"] == stats["kv_bytes_allocated"]
    # int4 and int2 borrow blocks for their full-precision windows while a request runs; the
    # others borrow none
    assert plan["window_blocks_per_request"] == stats["window_blocks_per_request"]
    assert (stats["window_blocks_per_request"] > 0) == (kv_dtype in ("int4", "int2"))
    assert stats["kv_bytes_allocated"] <= int(kv_memory.removesuffix("MiB")) * 2**20


def test_plan_reads_a_config_file_without_a_json_suffix(capsys, tmp_path):
    config = tmp_path / "config"
    config.write_text(json.dumps(PRESETS["llama-2-7b"][1]))
    code, out, err = run(capsys, "plan", "--model", str(config), "--context", "4096", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["source"] == "config" and plan["bytes_per_token"] == 524288


def test_plan_with_kv_memory_shows_its_capacity_and_refuses_a_reserve(capsys):
    code, out, err = run(capsys, "plan", "--model", "random", "--kv-memory", "8MiB",
                         "--context", "512")  # fmt: skip
    assert code == 0, err
    assert "budget" in out and "KV memory 8,388,608 B" in out
    assert "256 blocks = 4,096 tokens" in out  # 8 MiB / 32 KiB blocks
    code, out, err = run(capsys, "plan", "--model", "random", "--kv-memory", "8MiB",
                         "--reserve", "1MiB")  # fmt: skip
    assert code == 2 and "give it with --memory" in err


def test_plan_compare_counts_int2_capacity_as_the_engine_does(capsys):
    """--compare's int2 row and --kv-dtype int2 agree: windows come out of the budget."""
    args = ("plan", "--model", "llama-3.1-8b", "--memory", "24GiB", "--json")
    code, out, _ = run(capsys, *args, "--compare")
    rows = {r["kv_dtype"]: r for r in json.loads(out)["compare"]["kv_dtypes"]}
    assert code == 0
    code, out, _ = run(capsys, *args, "--kv-dtype", "int2")
    assert code == 0
    assert rows["int2"]["kv_capacity_tokens"] == json.loads(out)["kv_capacity_tokens"]


def test_plan_memory_that_holds_no_block_reports_zero_capacity(capsys):
    code, out, err = run(capsys, "plan", "--model", "llama-2-7b", "--memory", "13476832232B",
                         "--json")  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    assert plan["kv_capacity_blocks"] == 0 and plan["fits"] is False
