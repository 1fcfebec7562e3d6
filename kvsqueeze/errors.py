"""The one exception type the command line turns into a clear message and a non-zero exit."""

from __future__ import annotations


class KvsqueezeError(Exception):
    """A problem the user can fix: the message names the value and what was expected."""


def bad_value(field: str, value: object, expected: str) -> KvsqueezeError:
    """Build the standard bad-input error: ``<field>=<value>: expected <expected>``."""
    return KvsqueezeError(f"{field}={value!r}: expected {expected}")
