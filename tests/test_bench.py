"""`kvforge bench`: the quick sizes of each scenario, their files, and their exact counts."""

import json

import pytest
import torch

from kvforge.bench import SCENARIOS
from kvforge.bench.context import now
from kvforge.bench.report import Plot, Report, markdown
from kvforge.bench.workloads import mixed_workload
from kvforge.cli import main


def bench(capsys, tmp_path, scenario: str, *options: str) -> dict:
    code = main(["bench", scenario, "--quick", "--json", "--out", str(tmp_path), *options])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


@pytest.mark.slow
def test_throughput_quick_json(capsys, tmp_path):
    data = bench(capsys, tmp_path, "throughput", "--model", "random")
    engines = {r["engine"] for r in data["results"]}
    assert {"kvforge", "transformers generate", "transformers generate_batch"} <= engines
    settings = data["settings"]
    for row in data["results"]:
        # every engine generated exactly the seeded workload's tokens at its concurrency
        c = row["concurrency"]
        assert c in (1, 4)
        workload = mixed_workload(c, 32_000, tuple(settings["prompt"]),
                                  tuple(settings["output"]), seed=c)  # fmt: skip
        assert row["output_tokens"] == sum(r.max_tokens for r in workload)
        assert row["seconds"] > 0 and row["requests_per_s"] * row["seconds"] == pytest.approx(c)
    assert set(data["ratios"]["kvforge_vs_transformers"]) == {"1", "4"}
    same = data["ratios"]["greedy_tokens_equal_to_kvforge"]
    assert same["transformers generate"] == [True, True]
    assert same["transformers generate_batch"] == [True, True]
    if "llama.cpp" not in engines:
        assert any("pip install 'kvforge[peers]'" in n for n in data["notes"])
    assert {"cpu", "cores", "torch", "torch_threads"} <= set(data["machine"])
    assert data["machine"]["device"] == "cpu" and "gpu" not in data["machine"]
    for name in ("throughput.json", "throughput.md", "throughput.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert_versus(data, [f"{n} x (16 prompt + 8 generated), S t/s" for n in (1, 4)])


@pytest.mark.slow
def test_cache_quick_counts_the_triangle(capsys, tmp_path):
    data = bench(capsys, tmp_path, "cache")
    for row in data["results"]:
        n = row["n"]
        assert row["kv_rows_cached"] == n
        assert row["kv_rows_recompute"] == n * (n + 1) // 2
        assert row["same_tokens"] is True
    assert (tmp_path / "cache_per_step.png").exists() and (tmp_path / "cache_total.png").exists()


@pytest.mark.slow
def test_memory_quick_store_equals_planner(capsys, tmp_path):
    data = bench(capsys, tmp_path, "memory")
    for row in data["results"]:
        # tiny model: 2 layers × 2 KV heads × 32 head_dim × 2 (K, V) × 4 B
        assert row["bytes_per_token_store"] == row["bytes_per_token_planner"] == 1024
        assert row["kv_bytes_allocated"] == 256 * 2**20
        assert 0 <= row["waste_pct"] < 100
        assert row["peak_kv_bytes_of_live_tokens"] <= row["peak_kv_bytes_in_blocks"]
    assert data["ratios"]["store_equals_planner"] is True


def test_markdown_report():
    report = Report(
        scenario="demo",
        machine={"cpu": "x"},
        settings={"n": 2},
        results=[{"engine": "a", "tokens_per_s": 1234.5}, {"engine": "b", "tokens_per_s": 0.5}],
        ratios={"a_vs_b": 2469.0},
        plots=[Plot("demo.png", "Demo", "x", "y", {"a": ([1], [2])})],
    )
    assert markdown(report).splitlines()[:5] == [
        "# kvforge bench demo",
        "",
        "| engine | tokens_per_s |",
        "|---|---|",
        "| a | 1,234 |",
    ]


def test_bench_bad_input(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "nonsense"])
    assert exc.value.code == 2
    code = main(["bench", "memory", "--quick", "--model", str(tmp_path / "none")])
    assert code == 2
    assert "none': not a GGUF file, a checkpoint directory or one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "memory", "--device", "tpu"])
    assert exc.value.code == 2


def test_bench_cuda_without_a_gpu_is_a_usage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["bench", "roofline", "--quick", "--device", "cuda", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err == "kvforge bench: error: --device cuda: torch sees no CUDA device\n"
    assert not any(tmp_path.iterdir())


def test_clock_waits_for_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append(1))
    now("cpu")
    assert calls == []
    now("cuda")
    assert calls == [1]


@pytest.mark.slow
def test_latency_quick(capsys, tmp_path):
    data = bench(capsys, tmp_path, "latency", "--model", "random")
    prefill = [r for r in data["results"] if r["phase"] == "prefill"]
    decode = [r for r in data["results"] if r["phase"] == "decode"]
    assert sorted({r["prompt_tokens"] for r in prefill}) == [8, 32]
    assert sorted({r["context_tokens"] for r in decode}) == [16, 48]
    for row in data["results"]:
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert {r["samples"] for r in prefill} == {2}
    assert {r["samples"] for r in decode} == {2 * 5}  # 6 tokens: 5 gaps, 2 repeats
    assert set(data["ratios"]["transformers_over_kvforge_ttft_p50"]) == {"8", "32"}
    assert (tmp_path / "latency_ttft.png").exists() and (tmp_path / "latency_tpot.png").exists()
    assert_versus(data, ["prefill 32 (llama-bench -p)", "decode 8 at batch 1 (llama-bench -n)"])


def assert_versus(data: dict, workloads: list[str]) -> None:
    """llama.cpp's workloads ran on kvforge; llama.cpp too, or a note says how to get it."""
    versus = data["versus"]
    assert [r["workload"] for r in versus] == workloads
    assert all(r["kvforge t/s"] > 0 for r in versus)
    for row in versus:
        if row["llama.cpp t/s"] is None:
            assert row["kvforge ÷ llama.cpp"] is None
            assert any("LLAMACPP_BIN" in n for n in data["notes"])
        else:
            assert row["kvforge ÷ llama.cpp"] == row["kvforge t/s"] / row["llama.cpp t/s"]
    assert "On llama.cpp's own workloads" in markdown_of(data)


def markdown_of(data: dict) -> str:
    fields = {k: data[k] for k in ("scenario", "machine", "settings", "results", "ratios",
                                   "notes", "versus")}  # fmt: skip
    return markdown(Report(**fields))


@pytest.mark.slow
def test_latency_quick_on_the_default_model(capsys, tmp_path):
    # no --model: the real model, its GGUF file given to llama.cpp as it is
    data = bench(capsys, tmp_path, "latency")
    assert data["settings"]["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert data["settings"]["weights_dtype"] == "auto"
    assert_versus(data, ["prefill 32 (llama-bench -p)", "decode 8 at batch 1 (llama-bench -n)"])


@pytest.mark.slow
def test_roofline_quick(capsys, tmp_path):
    data = bench(capsys, tmp_path, "roofline", "--model", "random")
    values = {r["measure"]: r["value"] for r in data["results"]}
    assert values["memory bandwidth (copy)"] > 0 and values["matmul rate (fp32 GEMM 2048^3)"] > 0
    # tiny model, untied: every weight but the embedding table is read per token
    params = data["settings"]["parameters"]
    assert values["weights read per token"] == 4 * (params - 1000 * 128)
    assert values["KV read per token at 32 tokens"] == 32 * 1024
    for key in ("batch1_decode_vs_bandwidth_floor", "batched_decode_vs_compute_floor"):
        assert data["ratios"][key] > 0
    assert_versus(data, ["prefill 32 (llama-bench -p)", "decode 8 at batch 1 (llama-bench -n)"])
    assert data["ratios"]["kvforge_tg8_vs_weights_floor"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_quick_on_cuda(capsys, tmp_path, scenario):
    data = bench(capsys, tmp_path, scenario, "--device", "cuda")
    assert data["machine"]["device"] == "cuda"
    assert data["machine"]["gpu"] == torch.cuda.get_device_name()
    assert data["machine"]["cuda"] == torch.version.cuda
    if scenario == "roofline":
        values = {r["measure"]: r["value"] for r in data["results"]}
        assert values["matmul rate (fp32 GEMM 8192^3)"] > 0
    if scenario == "throughput":
        engines = {r["engine"] for r in data["results"]}
        assert {"kvforge", "transformers generate", "transformers generate_batch"} <= engines
    if scenario == "memory":
        assert data["ratios"]["peak_process_cuda_allocated_bytes"] >= 256 * 2**20


@pytest.mark.slow
def test_prefix_quick_reuses_the_shared_prefix(capsys, tmp_path):
    data = bench(capsys, tmp_path, "prefix")
    rows = {(r["workload"], r["setting"]): r for r in data["results"]}
    assert set(rows) == {
        ("shared prefix", "off"),
        ("shared prefix", "on"),
        ("shared prefix", "disk after restart"),
        ("multi-turn", "off"),
        ("multi-turn", "on"),
    }
    # a 96-token prefix (6 full blocks of 16) + an 8-token suffix, given as token ids
    assert rows["shared prefix", "off"]["cached_tokens_mean"] == 0
    assert rows["shared prefix", "on"]["cached_tokens_mean"] == 96
    assert rows["shared prefix", "disk after restart"]["cached_tokens_mean"] == 96
    assert rows["multi-turn", "on"]["hit_rate"] > 0
    assert data["ratios"]["same_tokens_on_and_off"] is True
    assert (tmp_path / "prefix_ttft.png").exists()


@pytest.mark.slow
def test_kvquant_quick_reports_every_codec(capsys, tmp_path):
    data = bench(capsys, tmp_path, "kvquant")
    rows = {r["kv_dtype"]: r for r in data["results"]}
    # each rotated format timed right after its unrotated one
    assert list(rows) == ["fp32", "fp16", "bf16", "int8", "int8+rot", "fp8", "int4", "int4+rot",
                          "int2", "int2+rot"]  # fmt: skip
    # the tiny bench model: 2 layers x 2 KV heads x head_dim 32; rotation costs no bytes;
    # int4 at 64-token blocks: K 16 + 32 x 4 / 64, V 16 + 4 B a head and token
    assert [rows[f]["bytes_per_token"] for f in rows] == [1024, 512, 512, 272, 272, 272, 152,
                                                          152, 88, 88]  # fmt: skip
    assert set(data["ratios"]["rotated_decode_vs_unrotated_long"]) == {"int8", "int4", "int2"}
    # int2: 64-token blocks, every byte of the budget (the windows borrow blocks as they run)
    assert rows["int2"]["block_size"] == 64
    assert rows["int2"]["tokens_in_budget"] == 4 * 2**20 // (88 * 64) * 64
    assert rows["fp32"]["token_agreement"] == 1.0 and rows["fp32"]["mean_kl"] == 0.0
    assert rows["int8"]["tokens_vs_fp16"] == pytest.approx(512 / 272, rel=0.01)
    assert all(r["decode_ms_long"] > 0 for r in rows.values())
