import pytest

from kvforge.errors import KVForgeError
from kvforge.units import format_bytes, format_count, parse_bytes, parse_count


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GiB", 80 * 2**30),
        ("80gib", 80 * 2**30),
        ("80G", 80 * 2**30),
        ("24g", 24 * 2**30),
        ("80GB", 80 * 10**9),
        ("1.5GiB", 1_610_612_736),
        ("0.1GB", 100_000_000),
        ("512MiB", 512 * 2**20),
        ("512 MiB", 512 * 2**20),
        ("1TiB", 2**40),
        ("2TB", 2 * 10**12),
        ("4096", 4096),
        ("4096B", 4096),
        ("1_000", 1000),
        ("1.5", 1),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "80 GiBs", "80XB", "GiB", "nan", "inf", "1e400x"])
def test_parse_bytes_rejects_unreadable(text):
    with pytest.raises(KVForgeError, match=r"cannot read .* as a memory size"):
        parse_bytes(text)


@pytest.mark.parametrize("text", ["0", "-1GiB", "0.1B"])
def test_parse_bytes_rejects_non_positive(text):
    with pytest.raises(KVForgeError, match="must be at least 1 byte"):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7B", 7 * 10**9), ("6738415616", 6_738_415_616), ("1.5M", 1_500_000), ("2t", 2 * 10**12)],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize("text", ["seven", "7Q", "0", "-3B"])
def test_parse_count_rejects(text):
    with pytest.raises(KVForgeError):
        parse_count(text)


def test_format_bytes_and_count():
    assert format_bytes(512) == "512 B"
    assert format_bytes(524_288) == "512.00 KiB"
    assert format_bytes(2_147_483_648) == "2.00 GiB"
    assert format_bytes(3 * 2**40) == "3.00 TiB"
    assert format_count(6_738_415_616) == "6.74B"
    assert format_count(405_853_388_800) == "405.85B"
    assert format_count(999) == "999"
