"""EleutherAI's lm-evaluation-harness against `kvforge serve`, on the local tasks of
tests/lm_eval_tasks: the harness's own clients (`local-completions` for loglikelihoods,
`local-chat-completions` for generation) talk to a real server on a free loopback port.

- kvforge_mc (30 questions, 4 choices): lm-eval scores each choice by the prompt
  logprobs that `/v1/completions` echoes (`echo`, `logprobs`, `max_tokens: 1`, the
  prompt as token ids). Its acc and acc_norm must equal those of lm-eval's `hf` backend
  (transformers) on the same GGUF file, and every choice's loglikelihood must be within
  float32 rounding of transformers'.
- kvforge_gen (8 questions): lm-eval sends chat requests (`--apply_chat_template`);
  every sample must be scored, with the answer kvforge gives the same request itself.

The server runs SmolLM2-135M-Instruct with dense fp32 weights, as transformers does.
Everything runs offline: the tokenizer lm-eval needs is the GGUF file's, saved to a
directory. About 3 minutes on 2 CPU cores, half of it lm-eval's `hf` run.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import transformers

from kvforge.models import catalog
from process_util import served

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")

pytestmark = pytest.mark.slow

TASKS = Path(__file__).parent / "lm_eval_tasks"
# dense fp32 weights and compute, as transformers runs the GGUF file
SERVE_ARGS = (
    "--device", "cpu", "--dtype", "fp32",
    "--weights-dtype", "fp32", "--kv-memory", "64MiB",
)  # fmt: skip
# Both sides compute in float32 (SmolLM2's logits agree within ~2e-4); a loglikelihood
# sums the logprobs of a choice's few tokens. The closest two choices of a question are
# 0.025 apart (0.008 per byte for acc_norm), so the accuracies must be equal exactly.
LOGLIKELIHOOD_ATOL = 1e-3
# The last word of an answer (kvforge_gen.yaml's filter), compared ignoring case.
LAST_WORD = re.compile(r"(\w+)\W*$")


@pytest.fixture(scope="module")
def gguf() -> Path:
    return catalog.smollm2_path()


@pytest.fixture(scope="module")
def tokenizer_dir(gguf, tmp_path_factory) -> Path:
    """The GGUF file's tokenizer saved as a tokenizer directory: what lm-eval's API
    clients load to count a prompt's tokens (offline, with no model hub)."""
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server():
    """(base URL, served model name) of `kvforge serve` with the default model."""
    with served(*SERVE_ARGS) as (_, url):
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        yield url, name


def run_lm_eval(
    out: Path, model: str, model_args: dict, task: str, *options: str
) -> tuple[dict, list[dict]]:
    """`lm_eval --model MODEL` on one local task; (its metrics, its samples by doc_id)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable, "-m", "lm_eval",
        "--model", model,
        "--model_args", ",".join(f"{key}={value}" for key, value in model_args.items()),
        "--tasks", task,
        "--include_path", str(TASKS),
        "--output_path", str(out / "results"),
        "--log_samples",
        *options,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    # the API clients log a refused request as "API request failed ...: <the server's body>"
    refused = [line for line in log.splitlines() if "API request failed" in line]
    assert proc.returncode == 0, (
        f"lm_eval --model {model} failed:\n" + "\n".join(refused[:3]) + "\n...\n" + log[-4000:]
    )
    (results,) = (out / "results").rglob("results_*.json")
    (samples,) = (out / "results").rglob(f"samples_{task}_*.jsonl")
    metrics = json.loads(results.read_text())["results"][task]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return metrics, sorted(rows, key=lambda row: row["doc_id"])


def loglikelihoods(sample: dict) -> list[float]:
    # resps: one [[loglikelihood, is_greedy]] per choice, as strings
    return [float(resp[0][0]) for resp in sample["resps"]]


def test_multiple_choice_scores_equal_transformers(server, gguf, tokenizer_dir, tmp_path):
    url, name = server
    ours, our_samples = run_lm_eval(
        tmp_path / "kvforge",
        "local-completions",
        {
            "model": name,
            "base_url": f"{url}/v1/completions",
            "tokenizer": tokenizer_dir,
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,  # the prompt goes as token ids, as lm-eval counted them
            "num_concurrent": 2,
            "max_retries": 1,
        },
        "kvforge_mc",
    )
    theirs, their_samples = run_lm_eval(
        tmp_path / "transformers",
        "hf",
        {
            "pretrained": gguf.parent,
            "gguf_file": gguf.name,
            "tokenizer": tokenizer_dir,
            "dtype": "float32",
        },
        "kvforge_mc",
        "--device", "cpu", "--batch_size", "8",
    )  # fmt: skip
    assert len(our_samples) == len(their_samples) == 30
    for mine, other in zip(our_samples, their_samples, strict=True):
        assert mine["doc"] == other["doc"]
        assert loglikelihoods(mine) == pytest.approx(
            loglikelihoods(other), abs=LOGLIKELIHOOD_ATOL
        ), mine["doc"]["question"]
    assert ours["acc,none"] == theirs["acc,none"]
    assert ours["acc_norm,none"] == theirs["acc_norm,none"]


def test_chat_generation_scores_kvforges_own_answers(server, tmp_path):
    url, name = server
    metrics, samples = run_lm_eval(
        tmp_path,
        "local-chat-completions",
        {
            "model": name,
            "base_url": f"{url}/v1/chat/completions",
            "num_concurrent": 2,
            "max_retries": 1,
        },
        "kvforge_gen",
        "--apply_chat_template",
    )
    assert len(samples) == 8
    scores = []
    for sample in samples:
        (prompt,) = sample["arguments"]["gen_args_0"]["arg_0"]  # the chat, as JSON
        options = sample["arguments"]["gen_args_0"]["arg_1"]
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": name,
                "messages": json.loads(prompt),
                "temperature": 0,
                "max_tokens": options["max_gen_toks"],
                "stop": options["until"],
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        answer = reply.json()["choices"][0]["message"]["content"]
        assert sample["resps"] == [[answer]], sample["doc"]["question"]
        assert sample["exact_match"] in (0.0, 1.0)
        word = LAST_WORD.search(answer)
        scores.append(float(word is not None and word[1].lower() == sample["target"].lower()))
    assert metrics["exact_match,last_word"] == pytest.approx(sum(scores) / len(scores))
