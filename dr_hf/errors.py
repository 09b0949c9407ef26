"""How dr-hf quotes another library's exception inside its own one-line messages."""

from __future__ import annotations


def said(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` of an exception on one line, at most ``limit`` characters (the Hub's and transformers'
    errors run to paragraphs, TorchCodec's loader errors to a list of every library it tried)."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
