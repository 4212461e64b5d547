"""Text helpers shared by every layer: messages are one line."""

from __future__ import annotations


def first_line(what: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (or of a text), at most `limit` characters; an
    exception with no message gives its class name."""
    text = str(what)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        return lines[0][:limit]
    return what.__class__.__name__ if isinstance(what, BaseException) else ""


def one_line(message: str, limit: int = 1000) -> str:
    """A message folded onto one line of bounded length, whatever value it quotes."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + " ... (truncated)"
