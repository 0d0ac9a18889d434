"""Human byte sizes: '10GB', '512MiB', '1.5 TB', '4096' <-> bytes.

Decimal units (kB, MB, GB, TB) are powers of 1000 and binary units (KiB,
MiB, GiB, TiB) powers of 1024, as in the SI/IEC standards; a bare number is
bytes. 'unlimited' (or 'none') means no limit and parses to None.
"""
from __future__ import annotations

import re
from decimal import Decimal

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
    "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
UNLIMITED_WORDS = ("unlimited", "none", "inf")


def parse_size(text: str | int) -> int | None:
    """Bytes for a human size; None for 'unlimited'. Raises ValueError."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    if text.strip().lower() in UNLIMITED_WORDS:
        return None
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"not a size: {text!r} (examples: 4096, 512MiB, 10GB, unlimited)")
    return int(Decimal(m.group(1)) * _UNITS[unit])  # exact: '1.001 kB' is 1001


def describe_size(n: int) -> str:
    """'1.9 MiB (1968000 B)', or just '90 B' where the two would repeat."""
    human = format_size(n)
    return human if human == f"{n} B" else f"{human} ({n} B)"


def format_size(n: int | None) -> str:
    """Short binary-unit form: 10737418240 -> '10.0 GiB'; None -> 'unlimited'."""
    if n is None:
        return "unlimited"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
