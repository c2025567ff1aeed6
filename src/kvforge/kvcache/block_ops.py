"""Operations on block contents, as plain data.

The KV cache manager decides what happens to blocks (bookkeeping only, no tensors);
whatever must happen to the K/V they hold is written down as one of these and
executed later, in order, against the store by the model runner
(`engine/runner.py`), before the forward pass that relies on it. Order is the
contract: an operation may read what an earlier one wrote, never a later one.
"""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoadBlocks:
    """Write blocks found in a lower tier (host, disk) into device blocks."""

    block_ids: list[int]
    contents: list[Any]  # as the tier returned them, one per block


@dataclass(frozen=True)
class SaveBlock:
    """Copy a device block to the lower tiers under `key`: an evicted cached block
    (`spill`), or a newly cached one written through to the disk tier."""

    block_id: int
    key: bytes
    spill: bool  # True: evicted (host, then disk); False: write-through to disk


@dataclass(frozen=True)
class SwapOut:
    """Copy a preempted request's blocks to host memory (kept under its id)."""

    request_id: str
    block_ids: list[int]


@dataclass(frozen=True)
class SwapIn:
    """Copy a request's swapped-out blocks back into (new) device blocks; its recent
    full-precision tokens (int4, int2) into the window blocks it borrows now."""

    request_id: str
    block_ids: list[int]
    window_blocks: list[int]


@dataclass(frozen=True)
class DropSwapped:
    """A swapped-out request ended while waiting: forget its host copy."""

    request_id: str


@dataclass(frozen=True)
class Retire:
    """A request lets go of blocks after `num_tokens` tokens (its whole ones first):
    the store settles what it keeps apart (int2's recent window)."""

    block_ids: list[int]
    num_tokens: int


@dataclass(frozen=True)
class MoveTokens:
    """Copy tokens' K/V between slots, every layer, as stored; sources are read
    before any destination is written."""

    src_slots: list[int]
    dst_slots: list[int]


@dataclass(frozen=True)
class CopyBlocks:
    """Copy whole blocks as stored, every layer; sources read before writes."""

    src_ids: list[int]
    dst_ids: list[int]


@dataclass(frozen=True)
class RotateKeys:
    """Re-rotate the keys at `slots` to `offset` positions after where they were first
    computed (streaming's sinks moving along). Their keys as first computed are read
    from the store at the first move and kept, for as long as `state` lives, by the
    runner (each rank its own heads'), so rounding and re-quantization never accumulate
    over a long run."""

    slots: list[int]
    offset: int
    state: Any  # the request's policy state (kvcache.policy.PolicyState)


BlockOp = (
    LoadBlocks | SaveBlock | SwapOut | SwapIn | DropSwapped | Retire | MoveTokens | CopyBlocks
    | RotateKeys
)  # fmt: skip
