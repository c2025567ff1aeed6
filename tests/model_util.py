"""Helpers the model tests share: logits of a whole prompt through kvforge's serving model."""

import torch

from kvforge.attention import AttentionMetadata
from kvforge.kvcache.formats import get_kv_format
from kvforge.kvcache.store import KVStore

BLOCK_SIZE = 16


def prefill_logits(llm, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab] float32
    """Every position's logits for `ids` in one pass of `llm`'s model (fused, packed
    weights, paged attention) over a fresh fp32 KV store of its own."""
    model = llm.engine.runner.model
    num_blocks = -(-len(ids) // BLOCK_SIZE)
    store = KVStore(model.config.spec, get_kv_format("fp32"), num_blocks, BLOCK_SIZE)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(len(ids)),
        query_start_loc=(0, len(ids)),
        seq_lens=(len(ids),),
        block_tables=torch.arange(num_blocks)[None],
        block_size=BLOCK_SIZE,
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), store, meta)
        return model.compute_logits(hidden)


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy tokens, exactly `new_tokens` of them (EOS ignored)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()
