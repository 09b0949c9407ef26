"""How dr-hf words errors: another library's exception quoted on one line, and parameters named as flags on the
command line."""

from __future__ import annotations

import re
import sys
from typing import Mapping, Tuple


def said(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` of an exception on one line, at most ``limit`` characters (the Hub's and transformers'
    errors run to paragraphs, TorchCodec's loader errors to a list of every library it tried)."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_PARAMETER = re.compile(r"`([A-Za-z_]\w*)`")


def with_flags(message: str, flags: Mapping[str, str]) -> str:
    """A library message as a command line says it: each parameter it names in backquotes (```num_samples```)
    written as its flag (``flags``: parameter -> flag, e.g. ``--num-samples``); a parameter without one keeps its
    quotes. Library errors name parameters this way, so that the CLI names flags without a message of its own."""
    return _PARAMETER.sub(lambda m: flags.get(m.group(1), m.group(0)), message)


def require_at_least(minimum: float, **values) -> None:
    """Refuse the first of ``values`` (parameter=value; ``None`` is not given) below ``minimum``, naming it."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise ValueError(f"`{name}` must be >= {minimum}, got {value}")


def network_errors() -> Tuple[type, ...]:
    """The transport errors (no connection, a timeout) of the HTTP client ``huggingface_hub`` uses: httpx2's in
    huggingface_hub 2, which are not ``OSError``s, as the Hub's own HTTP errors are."""
    from huggingface_hub.utils import get_session

    client = sys.modules.get(type(get_session()).__module__.split(".")[0])
    error = getattr(client, "TransportError", None)
    return (error,) if isinstance(error, type) else ()
