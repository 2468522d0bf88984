"""Flag strings to numbers: counts (`13B`), sizes (`24GiB`), bandwidths (`100Mbit`), fractions; errors name the flag."""

from __future__ import annotations

import re

from swarm.estimate.errors import EstimateInputError, SizeFormatError

GIB = 1 << 30
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_COUNT_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
_BYTE_UNITS = {"": 1, "B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
               "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_BIT_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
              "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
_BYTE_RATE_UNITS = {"B/s": 1, "kB/s": 1e3, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "MiB/s": 1 << 20, "GiB/s": 1 << 30}


def parse_number(text: str, flag: str, minimum: float = 0.0, exclusive: bool = True) -> float:
    """`1e10`, `13B`, `810M`, `20k`, `0.4` -> a number (suffixes are decimal: k, M, B = 10^9, T)."""
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([kKmMbBtT]?)\s*", str(text))
    if not match:
        raise SizeFormatError(f"{flag} {text!r}: expected a number such as 1e10, 13B, 810M or 512")
    value = float(match.group(1)) * _COUNT_SUFFIX[match.group(2).lower()]
    if value < minimum or (exclusive and value == minimum):
        raise EstimateInputError(f"{flag} {text!r}: must be {'more than' if exclusive else 'at least'} {minimum:g}")
    return value


def parse_count(text: str, flag: str) -> float:
    return parse_number(text, flag)


def parse_int(text: str, flag: str, minimum: int = 1) -> int:
    value = parse_number(text, flag, minimum, exclusive=False)
    if value != int(value):
        raise EstimateInputError(f"{flag} {text!r}: expected a whole number of at least {minimum}")
    return int(value)


def parse_bytes(text: str, flag: str) -> int:
    """`24GiB`, `512MiB`, `80GB`, `1e10` (bytes) -> bytes. Binary units are powers of 1024, others of 1000."""
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2) not in _BYTE_UNITS or float(match.group(1)) <= 0:
        raise SizeFormatError(f"{flag} {text!r}: expected a size such as 24GiB, 512MiB, 80GB or 1e10 (bytes); "
                              f"units: {', '.join(unit for unit in _BYTE_UNITS if unit)}")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])


def parse_bandwidth(text: str, flag: str) -> float:
    """`100Mbit`, `1Gbit`, `20Mbps`, `1Gbit/s`, `12.5MB/s` -> bytes per second (one direction of a link)."""
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([A-Za-z/]+)\s*", str(text))
    unit = match.group(2) if match else ""
    if match and unit.lower().removesuffix("/s") in _BIT_UNITS and float(match.group(1)) > 0:
        return float(match.group(1)) * _BIT_UNITS[unit.lower().removesuffix("/s")] / 8
    if match and unit in _BYTE_RATE_UNITS and float(match.group(1)) > 0:
        return float(match.group(1)) * _BYTE_RATE_UNITS[unit]
    raise SizeFormatError(f"{flag} {text!r}: expected a bandwidth such as 100Mbit, 1Gbit, 20Mbps or 12.5MB/s")


def parse_fraction(text: str, flag: str) -> float:
    value = parse_count(text, flag)
    if value > 1:
        raise EstimateInputError(f"{flag} {text!r}: expected a fraction in (0, 1], e.g. 0.4")
    return value
