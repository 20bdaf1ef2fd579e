"""How a validation error reads: one line per bad field, naming it and the fix; and how
config text (preset files, sweep specs, ``--set`` values) is read as YAML.

Shared by every config model (the run's ``AugmentConfig``, its components' own models, the
transfer config), so a bad ``--set`` reads the same whichever command took it.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import ValidationError

# A union's branches appear in an error's location by their type ("constrained-int",
# "literal['auto']", "list[int]", "function-after[...]"): left out of the key a message names.
_BRANCH = re.compile(r"^(int|float|str|bool|none|nullable|is-instance|(constrained|function|lax|"
                     r"strict|json)-.*|.*\[.*\])$")


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not _BRANCH.search(part):
            out += f".{part}" if out else part
    return out


def explain(err: ValidationError, what: str = "configuration", known=None) -> str:
    """``err`` as ``invalid <what>:`` and a line per problem; ``known`` (field names) is
    listed after an unknown parameter. The branches of a union (``arms_at_once``: a number
    or "auto") are one problem: one line, their messages joined by "or"."""
    problems: dict[str, list[str]] = {}
    for e in err.errors():
        loc = _format_loc(e["loc"])
        msg = e["msg"].replace("Value error, ", "")
        if e["type"] == "extra_forbidden":
            hint = f" (parameters: {', '.join(known)})" if known else ""
            problems.setdefault(f"unknown parameter {loc!r}", []).append(
                f"remove it or check its spelling{hint}")
        else:
            head = f"{loc}={e.get('input')!r}" if loc else ""
            if msg not in problems.setdefault(head, []):
                problems[head].append(msg)
    lines = [f"{head}: {' or '.join(msgs)}" if head else " or ".join(msgs)
             for head, msgs in problems.items()]
    if len(lines) == 1:  # one problem, one line: the usual case, and what a log line shows
        return f"invalid {what}: {lines[0]}"
    return f"invalid {what}:\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------------- YAML text


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two YAML 1.1 surprises removed: ``1e-4`` (no dot) is a
    float, as in YAML 1.2 and every other reader, not the string "1e-4" (strict fields
    would refuse it); and a key given twice is an error, not the last one silently kept."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping itself says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (keep one)", key_node.start_mark)
        return super().construct_mapping(node, deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


class YAMLTextError(ValueError):
    """Text that is not valid YAML; the message names where (``where``, line, column)."""


def load_yaml(text: str, where: str) -> Any:
    """``text`` read as YAML (safe: plain data only); a syntax error or a repeated key is
    one line naming ``where`` and the line and column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise YAMLTextError(f"{where} is not valid YAML{at}: {problem}") from None
