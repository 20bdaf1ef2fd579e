"""How a validation error reads: one line per bad field, naming it and the fix.

Shared by every config model (the run's ``AugmentConfig``, its components' own models, the
transfer config), so a bad ``--set`` reads the same whichever command took it.
"""

from __future__ import annotations

from pydantic import ValidationError


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "literal[")):
            out += f".{part}" if out else part
    return out


def explain(err: ValidationError, what: str = "configuration", known=None) -> str:
    """``err`` as ``invalid <what>:`` and a line per problem; ``known`` (field names) is
    listed after an unknown parameter."""
    lines = []
    for e in err.errors():
        loc = _format_loc(e["loc"])
        msg = e["msg"].replace("Value error, ", "")
        if e["type"] == "extra_forbidden":
            hint = f" (parameters: {', '.join(known)})" if known else ""
            lines.append(f"unknown parameter {loc!r}: remove it or check its spelling{hint}")
        elif loc:
            lines.append(f"{loc}={e.get('input')!r}: {msg}")
        else:
            lines.append(msg)
    return f"invalid {what}:\n  " + "\n  ".join(lines)
