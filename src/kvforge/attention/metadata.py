"""The layout of one forward pass, shared by every attention layer of that pass."""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat batch, and where its K/V live.

    The batch is flat: the new tokens of sequence i are rows
    query_start_loc[i] : query_start_loc[i + 1]. Each sequence's cache holds
    seq_lens[i] tokens after this step's write (cached context + new tokens),
    so its new tokens have positions seq_lens[i] - query_len .. seq_lens[i] - 1.

        sequence i:  | cached context ........ | new tokens (query) |
                     0                  seq_len - query_len      seq_len
    """

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    query_start_loc: tuple[int, ...]  # [B + 1]
    seq_lens: tuple[int, ...]  # [B]
    block_tables: torch.Tensor  # [B, max_blocks] int64, rows padded with block 0
    block_size: int
    # sequences whose attention this pass gathers (eviction policies), and the totals
    collect: "ScoreCollector | None" = None
    # what attention reads, built by the first layer and reused by the others
    plans: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]


@dataclass
class ScoreCollector:
    """Attention gathered in one forward pass for the sequences an eviction policy asked
    it for: per batch index, [kv_heads, seq_len] summed over the asked query rows, the
    query heads of each group and the layers."""

    modes: dict[int, str]  # batch index -> "all" or "window"
    window: dict[int, int] = field(default_factory=dict)  # batch index -> rows counted
    scores: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, i: int, scores: torch.Tensor) -> None:
        if i in self.scores:
            self.scores[i] += scores
        else:
            self.scores[i] = scores.clone()
