"""The values of one X/Y/Z plot axis, parsed from what the user typed, as A1111's xyz_grid reads them.

Items are comma separated, with CSV quoting for items that hold a comma (``a, "b, c"``). Numeric
axes also take ranges: ``1-5`` (step 1), ``1-10 (+2)`` (explicit step) and ``1-10 [5]`` (five
evenly spaced values; whole-number axes round them down as A1111 does). Float ranges are computed
in decimal, so ``0-1 (+0.1)`` gives 0.3 rather than 0.30000000000000004 and hits its end exactly.
A range's size is checked before it is expanded, so a typo such as ``1-1000000000`` fails at once.
"""
from __future__ import annotations

import csv
import io
import math
import re
from decimal import Decimal

from webui.errors import UserError

MAX_VALUES = 1000
KINDS = ("int", "float", "str")

_INT = r"[+-]?\d+"
_FLOAT = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_FORMS = "1-5, 1-10 (+2), 1-10 [5]"
_MAX_INT_DIGITS = 30


def _range_pattern(number: str) -> re.Pattern[str]:
    return re.compile(
        rf"(?P<start>{number})\s*-\s*(?P<end>{number})"
        rf"(?:\s*\(\s*(?P<step>{number})\s*\)|\s*\[\s*(?P<count>[+-]?\d+)\s*\])?"
    )


_INT_RANGE = _range_pattern(_INT)
_FLOAT_RANGE = _range_pattern(_FLOAT)


def _split_items(text: str, field: str) -> list[str]:
    """The comma-separated items of ``text`` (CSV quoting), stripped, empty ones dropped."""
    try:
        rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    except csv.Error as e:
        raise UserError(f"cannot split the values into items: {e}", field=field) from e
    return [item.strip() for row in rows for item in row if item.strip()]


def _step_count(item: str, start: Decimal | int, end: Decimal | int, step: Decimal | int) -> int:
    """How many values ``start, start + step, ...`` stay within ``end`` (inclusive)."""
    if step == 0:
        raise UserError(f"'{item}' has a step of 0")
    if (end - start) * step < 0:
        raise UserError(f"'{item}' has a step that points away from its end")
    return math.floor((end - start) / step) + 1


def _checked_count(item: str, count: int, room: int) -> int:
    if count < 1:
        raise UserError(f"'{item}' asks for {count} values; ask for at least 1")
    if count > room:
        raise UserError(f"'{item}' gives {count} values, taking the axis past the {MAX_VALUES} it may have")
    return count


def _bad_number(item: str) -> UserError:
    return UserError(f"'{item}' is not a number or a range like {_FORMS}")


def _int(item: str, text: str) -> int:
    if len(text.lstrip("+-")) > _MAX_INT_DIGITS:
        raise UserError(f"'{item}' is too large a number")
    return int(text)


def _decimal(item: str, text: str) -> Decimal:
    """The number as the float it will become, kept in decimal (``"0.1"`` stays 0.1) for exact steps."""
    value = float(text)
    if not math.isfinite(value):
        raise UserError(f"'{item}' is too large a number")
    return Decimal(repr(value))


# Per kind: a single number's pattern, a range's, how an endpoint or step is read, and the value it becomes.
_NUMBERS = {"int": (_INT, _INT_RANGE, _int, int), "float": (_FLOAT, _FLOAT_RANGE, _decimal, float)}


def _parse_number(item: str, room: int, kind: str) -> list:
    """One item of a numeric axis: a number or a range. Whole-number ``[count]`` ranges are spaced in float and
    truncated per value (A1111 uses numpy.linspace, then int()); decimal ones stay exact."""
    single, ranged, number, value = _NUMBERS[kind]
    if re.fullmatch(single, item):
        return [value(number(item, item))]
    match = ranged.fullmatch(item)
    if not match:
        raise _bad_number(item)
    start, end = number(item, match["start"]), number(item, match["end"])
    if match["count"] is not None:
        count = _checked_count(item, _int(item, match["count"]), room)
        if count == 1:
            return [value(start)]
        spacing = (end - start) / (count - 1)
        return [value(start + i * spacing) for i in range(count - 1)] + [value(end)]
    step = number(item, match["step"]) if match["step"] is not None else (1 if end >= start else -1)
    count = _checked_count(item, _step_count(item, start, end, step), room)
    return [value(start + i * step) for i in range(count)]


def parse_values(text: str | list[str], kind: str, field: str) -> list:
    """The values typed for one axis (or picked from a list, one item each): ints, floats or strings by ``kind``;
    every error names ``field``."""
    if kind not in KINDS:
        raise ValueError(f"unknown axis value kind {kind!r}; expected one of {KINDS}")
    if isinstance(text, str):
        items = _split_items(text, field)
    else:
        items = [str(item).strip() for item in text if str(item).strip()]
    if not items:
        raise UserError("no values given; type one or more, separated by commas", field=field)
    if kind == "str":
        values: list = items
    else:
        values = []
        try:
            for item in items:
                values += _parse_number(item, MAX_VALUES - len(values), kind)
        except UserError as e:
            raise UserError(e.message, field=field) from None
    if len(values) > MAX_VALUES:
        raise UserError(f"{len(values)} values given; an axis may have at most {MAX_VALUES}", field=field)
    return values


def format_value(value: int | float | str) -> str:
    """A label for one value: floats without trailing zeros (7.0 → "7", 0.250 → "0.25")."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)
