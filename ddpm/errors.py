"""Errors as one line: what every entry point (the `ddpm` command, `python -m ddpm.train_ddp`,
the flows, the champion server) prints for a mistake the user can fix."""

from __future__ import annotations

from pydantic import ValidationError


def one_line(error: BaseException | str, prefix: str = "") -> str:
    """`error` as one line: a pydantic ValidationError as 'section.field: message; ...' (fields
    prefixed with `prefix`), an exception with a `.message` (MLflow's) by it rather than its JSON,
    anything else by its text, or its type name when it has none."""
    if isinstance(error, ValidationError):
        return "; ".join(f"{prefix}{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in error.errors())
    text = error if isinstance(error, str) else (getattr(error, "message", None) or str(error) or type(error).__name__)
    return " ".join(str(text).split())
