"""How values are shown in error messages (standard library only)."""

from __future__ import annotations


def show(value: object, limit: int = 80) -> str:
    """``value`` as one short ASCII line of JSON."""
    import json  # here: the client imports this module before it needs json

    try:
        s = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def kind(value: object) -> str:
    """What a JSON value is, in words: "an object", "a string", ..."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    return type(value).__name__


def printable(raw: bytes, limit: int) -> str:
    """Bytes from a less trusted process as one line for our log: decoded
    leniently, every unprintable character (escape sequences, NUL, the
    line separators) shown as "?", at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else "?"
                   for c in raw.decode("utf-8", "replace")[:limit + 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."
