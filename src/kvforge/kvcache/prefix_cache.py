"""Chained block hashes: the key of a full KV block is everything that determines its K/V.

    seed  = H(format version, model identity, KV codec, block size, cache_salt)
    key_0 = H(seed,  tokens[0:B])
    key_i = H(key_{i-1}, tokens[iB:(i+1)B])

A block's K/V depend on every token before it, so its key chains over all of
them (through the previous key), and on what computed and stored them (the
seed). Two requests share a block only if every token up to the block's end
is the same, under the same model, codec, block size and salt — a different
`cache_salt` (one per tenant) makes every key different, so tenants never
share blocks.

H is SHA-256, truncated to nothing: 256-bit keys. A collision would hand a
request K/V of other tokens; with 2^40 blocks ever stored (a petabyte of
cache at 1 MiB a block) the chance that any two keys collide is about
2^80 / 2^256 = 2^-176, far below the rate of undetected memory errors, so
tokens are not compared on a hit. Keys are stable across processes and
machines (no Python `hash`), which the disk tier relies on.
"""

import hashlib
import struct
from collections.abc import Sequence

HASH_VERSION = b"kvforge-prefix-v1"


def chain_seed(model_id: str, codec: str, block_size: int, salt: str | None = None) -> bytes:
    """The key every chain starts from: what computed and stored the blocks, and the salt."""
    h = hashlib.sha256(HASH_VERSION)
    for part in (model_id, codec, str(block_size), "" if salt is None else f"salt:{salt}"):
        data = part.encode()
        h.update(struct.pack("<I", len(data)) + data)  # length-prefixed: no ambiguity
    return h.digest()


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of one full block: the previous key (or the seed) and the block's tokens."""
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


def extend_keys(keys: list[bytes], seed: bytes, token_ids: Sequence[int], block_size: int) -> None:
    """Append the keys of the full blocks of `token_ids` that `keys` does not have yet."""
    for i in range(len(keys), len(token_ids) // block_size):
        parent = keys[i - 1] if i else seed
        keys.append(block_key(parent, token_ids[i * block_size : (i + 1) * block_size]))
