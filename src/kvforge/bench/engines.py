"""The engines a scenario compares, behind one call: greedy tokens for a list of requests.

Every engine returns exactly `max_tokens` tokens per request (EOS ignored), so
output tokens count the same everywhere. transformers' padded `generate` and
`generate_batch` take one length for the whole batch: they generate the longest
request's length for every request (the cost of that method) and the extra
tokens are cut off, not counted.
"""

from functools import cache
from pathlib import Path

import torch

from kvforge.bench.workloads import Request


class KVForgeEngine:
    name = "kvforge"

    def __init__(
        self,
        model_path: Path,
        max_num_seqs: int,
        kv_memory: str = "1GiB",
        *,
        device: str,
        weights_dtype: str = "auto",
        tensor_parallel_size: int = 1,
    ) -> None:
        from kvforge import LLM

        self.llm = LLM(
            model=str(model_path),
            device=device,
            weights_dtype=weights_dtype,
            tensor_parallel_size=tensor_parallel_size,
            kv_memory=kv_memory,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(2048, max_num_seqs),
        )

    def generate(self, requests: list[Request]) -> list[list[int]]:
        from kvforge import SamplingParams

        params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
        outs = self.llm.generate([r.prompt_token_ids for r in requests], params)
        return [o.token_ids for o in outs]


def hf_model(model_path: Path, device: str):
    """The transformers model in eval mode on `device`: one loader for every HF peer.

    A GGUF file is dequantized by transformers' own GGUF loader, to float32.
    """
    import transformers

    model_path = Path(model_path)
    if model_path.is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_path.parent, gguf_file=model_path.name, dtype=torch.float32
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
    return model.eval().to(device)


class HFGenerateEngine:
    """transformers `generate` on one left-padded batch."""

    name = "transformers generate"

    def __init__(self, model_path: Path, device: str) -> None:
        self.model = hf_model(model_path, device)
        self.device = device

    def generate(self, requests: list[Request]) -> list[list[int]]:
        width = max(len(r.prompt_token_ids) for r in requests)
        new_tokens = max(r.max_tokens for r in requests)
        ids = torch.tensor(
            [[0] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids for r in requests],
            device=self.device,
        )
        lengths = torch.tensor([len(r.prompt_token_ids) for r in requests], device=self.device)
        mask = (torch.arange(width, device=self.device)[None] >= (width - lengths)[:, None]).long()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return [
            row[width : width + r.max_tokens].tolist() for row, r in zip(out, requests, strict=True)
        ]


class HFGenerateBatchEngine:
    """transformers `generate_batch`: its own continuous batching."""

    name = "transformers generate_batch"

    def __init__(self, model_path: Path, device: str) -> None:
        # generate_batch takes token-id lists and puts its own tensors on the model's device
        self.model = hf_model(model_path, device)

    def generate(self, requests: list[Request]) -> list[list[int]]:
        import transformers

        config = transformers.GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in requests),
            do_sample=False,
            eos_token_id=-1,
            pad_token_id=0,
        )
        # warmup=False: the scenario warms every engine up once before timing, and
        # generate_batch's own warm-up would otherwise be paid (seconds) on every call
        out = self.model.generate_batch(
            inputs=[r.prompt_token_ids for r in requests], generation_config=config, warmup=False
        )
        order = sorted(out, key=lambda k: int(str(k).rsplit("_", 1)[-1]))
        return [
            out[k].generated_tokens[: r.max_tokens] for k, r in zip(order, requests, strict=True)
        ]


def transformers_engines(model_path: Path, device: str) -> list:
    return [HFGenerateEngine(model_path, device), HFGenerateBatchEngine(model_path, device)]


@cache
def gguf_of(model_path: Path) -> Path:
    """The GGUF file llama.cpp runs: the model's own, or for a checkpoint directory the
    same weights written as an f32 GGUF once by kvforge's converter."""
    import tempfile

    from kvforge.models.gguf_export import export_gguf

    gguf = Path(model_path)
    if gguf.is_dir():
        gguf = Path(tempfile.mkdtemp(prefix="kvforge-gguf-")) / "model-f32.gguf"
        export_gguf(model_path, gguf, dtype="f32")
    return gguf


def llamacpp_peer(model_path: Path):
    """The llama.cpp engine on the same weights, or the line saying how to install it.

    It offloads no layers (llama.cpp's n_gpu_layers 0): it runs on the CPU whatever --device is.
    """
    try:
        from kvforge.bench.llamacpp import LlamaCppEngine, llamacpp_available
    except ImportError:
        return "llama.cpp peer skipped: pip install 'kvforge[peers]'"
    missing = llamacpp_available()
    if missing:
        return missing
    return LlamaCppPeer(model_path, LlamaCppEngine)


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python on the same GGUF file, or on one written by
    kvforge's own converter from a checkpoint directory."""

    name = "llama.cpp"

    def __init__(self, model_path: Path, engine_class) -> None:
        from kvforge.models.catalog import model_config

        config = model_config(model_path)
        self.engine = engine_class(gguf_of(model_path), n_ctx=config["max_position_embeddings"])

    def generate(self, requests: list[Request]) -> list[list[int]]:
        # llama-cpp-python serves one sequence at a time: requests run one after another
        return [self.engine.generate_greedy(r.prompt_token_ids, r.max_tokens) for r in requests]
