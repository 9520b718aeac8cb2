"""Adapter option values against the constructor's annotations and its table of ranges.

Shared by the config pre-check (``config_checks``, which reads the annotations and the
table from the adapter's source, never importing it) and the adapter constructors (which
pass their own ``__init__``), so a config file and a direct library call get one message:
``vocoder_batch_size: 0 is not allowed; a whole number >= 1``.

Annotations are read as source text (``"int"``, ``"float | None"``, ``"Literal['a', 'b']"``,
``"Sequence[int]"``); a name this module does not know (``os.PathLike``, a class) accepts
anything, and so does a union that holds one. ``int`` takes whole numbers but not
``true``/``false``; ``float`` takes whole numbers too. Ranges (``OPTION_RANGES`` next to each
adapter: option -> ``(min, max)``, inclusive, ``None`` for no bound, or ``(min, max, "(]")``
with the interval's brackets where a bound is excluded) apply to numbers only.
Pure Python on purpose: the pre-check imports it while Snakemake builds the DAG.
"""

from __future__ import annotations

import ast
import numbers
from typing import Any, Callable, Mapping

Bounds = tuple  # (min, max) inclusive, or (min, max, brackets) as "(]"; None: unbounded on that side
_SEQUENCES = {"Sequence", "list", "tuple"}


def value_problem(value: Any, annotation: str | None, bounds: Bounds | None = None) -> str | None:
    """What is accepted, when ``value`` is not; ``None`` when it is or nothing can be told."""
    if annotation is None and bounds is None:
        return None
    node = ast.parse(annotation, mode="eval").body if annotation else ast.Name("float")  # a range: a number
    if _accepts(node, value, bounds) is False:
        return _describe(node, bounds)
    return None


def option_message(name: str, value: Any, accepted: str) -> str:
    shown = {True: "true", False: "false"}.get(value, repr(value)) if isinstance(value, bool) else (
        "null" if value is None else repr(value))  # as the config file spells it
    return f"{name}: {shown} is not allowed; {accepted}"


def check_arguments(function: Callable, ranges: Mapping[str, Bounds], arguments: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming every ranged argument of ``function`` whose value is refused.

    Only the options in ``ranges`` (of those given in ``arguments``) are checked here (their annotations tell int from float):
    library callers may pass objects a config cannot (a ``torch.device``, a ``Path``).
    """
    annotations = getattr(function, "__annotations__", {})
    problems = []
    for name, bounds in ranges.items():
        if name not in arguments:
            continue
        annotation = annotations.get(name)
        accepted = value_problem(arguments[name], annotation if isinstance(annotation, str) else None, bounds)
        if accepted is not None:
            problems.append(option_message(name, arguments[name], accepted))
    if problems:
        raise ValueError("; ".join(problems))


# ---------------------------------------------------------------------------- annotations


def _members(node: ast.expr) -> list[ast.expr]:
    """The members of ``X | Y`` or ``Optional[X]`` / ``Union[X, Y]``, else ``[node]``."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _members(node.left) + _members(node.right)
    if isinstance(node, ast.Subscript) and _name(node.value) in ("Optional", "Union"):
        inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return [m for e in inner for m in _members(e)] + ([ast.Constant(None)] if _name(node.value) == "Optional" else [])
    return [node]


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):  # typing.Literal, collections.abc.Sequence
        return node.attr
    return None


def _accepts(node: ast.expr, value: Any, bounds: Bounds | None) -> bool | None:
    """``None``: the annotation holds something unknown, so nothing can be told."""
    answers = [_accepts_one(m, value, bounds) for m in _members(node)]
    if any(a is None for a in answers):
        return None
    return any(answers)


def _accepts_one(node: ast.expr, value: Any, bounds: Bounds | None) -> bool | None:
    if isinstance(node, ast.Constant) and node.value is None or _name(node) == "None":
        return value is None
    name = _name(node.value) if isinstance(node, ast.Subscript) else _name(node)
    if isinstance(node, ast.Subscript) and name == "Literal":
        choices = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return any(isinstance(c, ast.Constant) and type(c.value) is type(value) and c.value == value for c in choices)
    if isinstance(node, ast.Subscript) and name in _SEQUENCES:
        element = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice
        if not isinstance(value, (list, tuple)):
            return False
        answers = [_accepts(element, v, None) for v in value]
        return None if any(a is None for a in answers) else all(answers)
    if name == "bool":
        return isinstance(value, bool)
    if name == "str":
        return isinstance(value, str)
    if name in ("int", "float"):
        kind = numbers.Integral if name == "int" else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            return False
        low, high, (left, right) = _interval(bounds)
        above = low is None or (value > low if left == "(" else value >= low)
        below = high is None or (value < high if right == ")" else value <= high)
        return above and below
    return None


def _interval(bounds: Bounds | None) -> tuple:
    """``(low, high, brackets)`` of a range as written in a table; inclusive by default."""
    if bounds is None:
        return None, None, "[]"
    low, high, *brackets = bounds
    brackets = brackets[0] if brackets else "[]"
    if len(brackets) != 2 or brackets[0] not in "[(" or brackets[1] not in "])":
        raise ValueError(f"range {bounds!r}: brackets must be one of '[]', '(]', '[)', '()'")
    return low, high, brackets


def _describe(node: ast.expr, bounds: Bounds | None) -> str:
    return " or ".join(_describe_one(m, bounds) for m in _members(node))


def _describe_one(node: ast.expr, bounds: Bounds | None) -> str:
    if isinstance(node, ast.Constant) and node.value is None or _name(node) == "None":
        return "null"
    name = _name(node.value) if isinstance(node, ast.Subscript) else _name(node)
    if isinstance(node, ast.Subscript) and name == "Literal":
        choices = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return "one of " + ", ".join(repr(c.value) for c in choices)
    if isinstance(node, ast.Subscript) and name in _SEQUENCES:
        element = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice
        return f"a list, each {_describe(element, None)}"
    if name in ("int", "float"):
        return ("a whole number" if name == "int" else "a number") + _range_text(bounds)
    return {"bool": "true or false", "str": "a string"}.get(name, ast.unparse(node))


def _range_text(bounds: Bounds | None) -> str:
    low, high, (left, right) = _interval(bounds)
    if low is not None and high is not None:
        return f" in {left}{low}, {high}{right}"
    if low is not None:
        return f" > {low}" if left == "(" else f" >= {low}"
    if high is not None:
        return f" < {high}" if right == ")" else f" <= {high}"
    return ""
