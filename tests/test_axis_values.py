import pytest

from webui.engine.axis_values import MAX_VALUES, format_value, parse_values
from webui.errors import UserError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-1, +3,  7 ", [-1, 3, 7]),
        ("1-5", [1, 2, 3, 4, 5]),
        ("1-10 (+2)", [1, 3, 5, 7, 9]),
        ("10-1 (-3)", [10, 7, 4, 1]),
        ("1-10 [5]", [1, 3, 5, 7, 10]),
        ("-5--1", [-5, -4, -3, -2, -1]),
        ("3-1", [3, 2, 1]),
        ("4-4", [4]),
        ("1 - 3 ( +1 )", [1, 2, 3]),
        ("2-9 [1]", [2]),
        ("-7-3 [6]", [-7, -5, -3, -1, 1, 3]),
        ("1-3, 10, 20-22 (+2)", [1, 2, 3, 10, 20, 22]),
    ],
)
def test_int_values_and_ranges(text, expected):
    assert parse_values(text, "int", "x_values") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7, 3.5, -0.5, 1e-3, .5", [7.0, 3.5, -0.5, 0.001, 0.5]),
        ("1-2 (+0.25)", [1.0, 1.25, 1.5, 1.75, 2.0]),
        ("1-2 [3]", [1.0, 1.5, 2.0]),
        ("1-3", [1.0, 2.0, 3.0]),
        ("0-1 (+0.1)", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        ("-0.3-0.3 (+0.1)", [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]),
        ("2-1 (-0.4)", [2.0, 1.6, 1.2]),
        ("1e-3-3e-3 [3]", [0.001, 0.002, 0.003]),
    ],
)
def test_float_values_and_ranges(text, expected):
    values = parse_values(text, "float", "cfg")
    assert values == expected
    assert all(isinstance(v, float) for v in values)


def test_strings_split_with_csv_quoting_and_empty_items_dropped():
    assert parse_values('a, "b, c" ,, d e ,', "str", "prompt") == ["a", "b, c", "d e"]
    assert parse_values("one\ntwo, three", "str", "prompt") == ["one", "two", "three"]
    assert parse_values("1-5", "str", "prompt") == ["1-5"]


@pytest.mark.parametrize("text", ["", "  ", ", ,", '""'])
def test_no_values_is_a_user_error_on_the_field(text):
    with pytest.raises(UserError, match="no values") as e:
        parse_values(text, "int", "y_values")
    assert e.value.field == "y_values"


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        ("1, abc", "int", "'abc' is not a number or a range like 1-5, 1-10 (+2), 1-10 [5]"),
        ("1.5", "int", "'1.5' is not a number"),
        ("1-2-3", "int", "'1-2-3' is not a number"),
        ("1-10 (2", "int", "'1-10 (2' is not a number"),
        ("nan", "float", "'nan' is not a number"),
        ("inf", "float", "'inf' is not a number"),
        ("1e999", "float", "'1e999' is too large"),
        ("9" * 40, "int", "too large"),
        ("1-10 (-2)", "int", "'1-10 (-2)' has a step that points away"),
        ("10-1 (+1)", "int", "'10-1 (+1)' has a step that points away"),
        ("1-2 (-0.5)", "float", "'1-2 (-0.5)' has a step that points away"),
        ("1-10 (0)", "int", "'1-10 (0)' has a step of 0"),
        ("1-2 (+0.0)", "float", "'1-2 (+0.0)' has a step of 0"),
        ("1-10 [0]", "int", "'1-10 [0]' asks for 0 values"),
        ("1-2 [-3]", "float", "'1-2 [-3]' asks for -3 values"),
    ],
)
def test_bad_items_are_named_in_a_user_error_on_the_field(text, kind, message):
    with pytest.raises(UserError) as e:
        parse_values(text, kind, "z_values")
    assert message in e.value.message
    assert e.value.field == "z_values"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("1-1000000000", "int"),
        ("1-1000000000 [1000000000]", "int"),
        ("0-1 (+0.0000000001)", "float"),
        ("1-1e300 [1000000000]", "float"),
    ],
)
def test_a_huge_range_fails_before_it_is_expanded(text, kind):
    with pytest.raises(UserError, match=f"past the {MAX_VALUES}") as e:
        parse_values(text, kind, "x_values")
    assert e.value.field == "x_values"


def test_the_limit_counts_values_across_items():
    assert len(parse_values(f"1-{MAX_VALUES}", "int", "x")) == MAX_VALUES
    with pytest.raises(UserError, match="'5-6'"):
        parse_values(f"1-{MAX_VALUES - 1}, 5-6", "int", "x")
    with pytest.raises(UserError, match=f"at most {MAX_VALUES}") as e:
        parse_values(f"1-{MAX_VALUES}, 7", "int", "x")
    assert e.value.field == "x"
    with pytest.raises(UserError, match=f"at most {MAX_VALUES}"):
        parse_values(",".join(["a"] * (MAX_VALUES + 1)), "str", "x")


def test_an_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="kind"):
        parse_values("1", "bool", "x")


@pytest.mark.parametrize(
    ("value", "text"),
    [(7.0, "7"), (3.5, "3.5"), (0.25, "0.25"), (-0.5, "-0.5"), (0.001, "0.001"), (12, "12"), (-3, "-3"), ("a b", "a b")],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_formatted_range_values_carry_no_float_noise():
    assert [format_value(v) for v in parse_values("0.1-0.3 (+0.1)", "float", "x")] == ["0.1", "0.2", "0.3"]
