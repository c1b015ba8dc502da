"""Field kinds are read from the values' shape, and comparisons level pairs by kind."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nem_llm.records.comparisons import LEVELS, comparison_for
from nem_llm.records.fields import FieldSpec, as_text, infer_fields, infer_kind, normalize_value


def _kind(values: list[str]) -> str:
    return infer_kind(values)[0]


def test_dates_in_compact_and_iso_forms_are_dates() -> None:
    assert _kind(["19651013", "19390212", "20010101"]) == "date"
    assert _kind(["1965-10-13", "13/10/1965", "2001-1-2"]) == "date"


def test_four_digit_values_beyond_2100_are_codes_and_within_are_years() -> None:
    postcodes = [str(n) for n in range(2000, 9000, 37)]
    years = [str(y) for y in range(1950, 2020)]
    assert _kind(postcodes) == "code"
    assert infer_kind(years) == ("number", "whole numbers between 1000 and 2100 (years)")


def test_leading_zeros_phone_numbers_and_alphanumeric_postcodes_are_codes() -> None:
    assert _kind(["02139", "10001", "94105"]) == "code"
    assert _kind(["310-475-3585", "(212) 555-0199", "415 555 0100"]) == "code"
    assert _kind(["SW1A 1AA", "EC1A 1BB", "W1A 0AX"]) == "code"


def test_measurements_are_numbers() -> None:
    assert _kind(["12.5", "3", "1,200.75", "0.5"]) == "number"


def test_few_distinct_values_over_many_entities_are_a_category() -> None:
    states = ["nsw", "vic", "qld", "wa"] * 25
    assert _kind(states) == "category"


def test_a_handful_of_entities_is_never_read_as_a_category() -> None:
    assert _kind(["Ann Lee", "Bo Chen"]) == "name"


def test_short_values_are_names_and_long_or_numbered_ones_text() -> None:
    names = [
        f"{first} {last}"
        for first in ("ann", "bo", "cy", "di", "ed", "flo")
        for last in ("lee", "chen", "o'brien", "roe", "smith", "ng")
    ]
    assert _kind(names) == "name"
    titles = ["Fast algorithms for projected clustering in high dimensional spaces"] * 3
    assert _kind(titles) == "text"
    assert _kind(["3 light street, pine hill", "47 edkins street"] * 5) == "text"


def test_a_field_that_joins_two_others_is_skipped_with_the_reason() -> None:
    rows = [
        {"name": f"{first} {last}", "first": first, "last": last}
        for first, last in [("ann", "lee"), ("bo", "chen"), ("cy", "roe")] * 5
    ]
    specs = {s.name: s for s in infer_fields(rows)}
    assert specs["name"].kind == "skip"
    assert "first + last" in specs["name"].reason
    assert specs["first"].kind == "name"


def test_kinds_given_by_name_override_inference() -> None:
    rows = [{"zip": "02139", "notes": "called twice"}] * 3
    specs = infer_fields(rows, kinds={"zip": "text", "notes": "skip", "vip": "category"})
    assert [(s.name, s.kind) for s in specs] == [
        ("zip", "text"),
        ("notes", "skip"),
        ("vip", "category"),
    ]


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        FieldSpec("x", "fuzzy")  # type: ignore[arg-type]


@pytest.mark.parametrize("missing", [None, "", "   ", math.nan, []])
def test_missing_values_read_as_none(missing: object) -> None:
    assert as_text(missing) is None


def test_values_are_folded_to_lowercase_ascii_per_kind() -> None:
    assert normalize_value("Ελλάδα", "name") == "ellada"
    assert normalize_value("O'Brien-Smith", "name") == "obrien smith"
    assert normalize_value("(310) 475-3585", "code") == "3104753585"
    assert normalize_value("1965-10-13", "date") == "19651013"
    assert normalize_value("1,200.5", "number") == "1200.5"


def _levels(kind: str, catalog: list[str], left: list[str], right: list[str]) -> list[str]:
    comparison = comparison_for(FieldSpec("f", kind), catalog)  # type: ignore[arg-type]
    a, b = comparison.prepare(left), comparison.prepare(right)
    idx = np.arange(len(left))
    return [comparison.labels[x] for x in comparison.levels(a, b, idx, idx)]


def test_name_levels_from_exact_to_else_and_null() -> None:
    got = _levels(
        "name",
        ["x"],
        ["mitchell", "jonathan", "hotel bel air", "white", "mason", "anna", None],  # type: ignore[list-item]
        ["Mitchell", "jonathon", "bel air hotel", "mitchell white", "maxon", "zed", "anna"],
    )
    assert got == [
        "exact",
        "jw>=0.92 or same words",
        "jw>=0.92 or same words",
        "words within",
        "jw>=0.80",
        "else",
        "null",
    ]


def test_date_levels_read_typos_swaps_and_the_year() -> None:
    got = _levels(
        "date",
        ["19650101"],
        ["19651013", "19651013", "19651013", "19651013"],
        ["1965-10-13", "19651031", "19651310", "19650501"],
    )
    assert got == ["exact", "1 edit or swap", "1 edit or swap", "same year"]


def test_code_levels_count_edits() -> None:
    got = _levels(
        "code", ["4223"], ["4223", "4223", "4223", "4223"], ["4223", "4232", "4332", "9999"]
    )
    assert got == ["exact", "1 edit", "2 edits", "else"]


def test_number_levels_scale_with_the_catalog() -> None:
    catalog = [str(x) for x in range(0, 100_000, 100)]
    got = _levels("number", catalog, ["50000", "50000", "50000"], ["50100", "55000", "90000"])
    assert got == ["near", "close", "else"]


def test_text_levels_read_containment_and_disagreeing_numbers() -> None:
    got = _levels(
        "text",
        ["x"],
        ["854 7th ave. between 54th and 55th sts.", "3700 w. flamingo rd.", "unix rdbms"],
        ["854 seventh ave.", "3900 w. flamingo rd.", "unix rdbms: the next generation"],
    )
    assert got[0] == "jaccard>=0.65"  # the house number and "ave" of the shorter are in
    assert got[1] == "else"  # same street, other number
    assert got[2] in LEVELS["text"][-3:-1]
