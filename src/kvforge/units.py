"""Parsing and printing sizes and counts, exactly.

Byte sizes accept binary units (KiB, MiB, GiB, TiB; also the one-letter forms
K, M, G, T as in `free -g` and `docker --memory 2g`) and decimal units (KB, MB,
GB, TB). Fractions are allowed ("1.5GiB") and rounded down to whole bytes;
parsing goes through `Decimal` so "0.1GB" is exactly 100,000,000 bytes.
"""

from decimal import Decimal, InvalidOperation

from kvforge.errors import KVForgeError

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}

_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def _scaled(text: str, units: dict[str, int]) -> int | None:
    """'1.5GiB' with binary units -> 1610612736 (rounded down); None if unreadable."""
    text = str(text).strip().replace("_", "").replace(",", "")
    end = len(text)
    while end > 0 and text[end - 1].isalpha():
        end -= 1
    number, unit = text[:end].strip(), text[end:].lower()
    try:
        value = Decimal(number)
    except InvalidOperation:
        return None
    if not value.is_finite() or unit not in units:
        return None
    return int(value * units[unit])


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920; a positive whole number of bytes, or KVForgeError."""
    num_bytes = _scaled(text, _BYTE_UNITS)
    if num_bytes is None:
        raise KVForgeError(
            f"cannot read {text!r} as a memory size: use a number of bytes or a unit "
            "such as 512MiB, 24GiB, 80GB (K/M/G/T are binary, KB/MB/GB/TB decimal)"
        )
    if num_bytes <= 0:
        raise KVForgeError(f"memory size {text!r} must be at least 1 byte")
    return num_bytes


def parse_count(text: str) -> int:
    """'7B' -> 7_000_000_000, '6738415616' -> itself; decimal suffixes K, M, B (or G), T."""
    count = _scaled(text, _COUNT_UNITS)
    if count is None:
        raise KVForgeError(
            f"cannot read {text!r} as a count: use a whole number or a suffix K, M, B, T "
            "(e.g. 7B, 6738415616)"
        )
    if count <= 0:
        raise KVForgeError(f"count {text!r} must be positive")
    return count


def format_bytes(num_bytes: float) -> str:
    """Binary units with three significant decimals: 2147483648 -> '2.00 GiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_count(count: int) -> str:
    """Short decimal form for parameter counts: 6738415616 -> '6.74B'."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)
