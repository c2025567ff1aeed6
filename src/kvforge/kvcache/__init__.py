"""The KV cache: formats, blocks, tables, prefix cache, store, tiers."""
