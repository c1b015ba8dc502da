"""Catalog loading: dicts, Entity models, JSONL and CSV files; every invalid row is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nem_llm.catalog import MAX_FORM_CHARS, Catalog, CatalogColumns, load_catalog
from nem_llm.errors import CatalogError, ConfigError, InputError, NemLLMError
from nem_llm.matcher import Matcher
from nem_llm.models import Entity
from nem_llm.testing import FakeEmbedder


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- what loads ----------------------------------------------------------------------------


def test_dicts_and_entity_models_load_in_input_order() -> None:
    catalog = load_catalog([{"id": "US", "name": "United States"}, Entity(id="DE", name="Germany")])
    assert [e.id for e in catalog.entities] == ["US", "DE"]
    assert catalog.by_id == {"US": 0, "DE": 1}


def test_integer_ids_are_accepted_as_strings() -> None:
    catalog = load_catalog([{"id": 7, "name": "Seven"}])
    assert catalog.entities[0].id == "7"


def test_boolean_id_is_rejected() -> None:
    with pytest.raises(CatalogError, match=r"entities\[0\].*'id'"):
        load_catalog([{"id": True, "name": "Yes"}])


def test_null_aliases_and_description_mean_none() -> None:
    catalog = load_catalog([{"id": "a", "name": "A", "aliases": None, "description": None}])
    assert catalog.entities[0].aliases == []
    assert catalog.entities[0].description == ""


def test_surface_forms_are_the_name_then_each_distinct_alias() -> None:
    catalog = load_catalog(
        [
            {"id": "US", "name": "United States", "aliases": ["USA", "United States", "USA"]},
            {"id": "DE", "name": "Germany", "aliases": ["Deutschland"]},
        ]
    )
    assert catalog.forms == ("United States", "USA", "Germany", "Deutschland")
    assert catalog.form_entity == (0, 0, 1, 1)


def test_index_description_adds_a_name_and_description_form() -> None:
    rows = [{"id": "r1", "name": "spago", "description": "1114 horn ave., los angeles"}]
    assert load_catalog(rows).forms == ("spago",)
    assert load_catalog(rows, include_description=True).forms == (
        "spago",
        "spago, 1114 horn ave., los angeles",
    )


def test_a_catalog_passes_through_unchanged() -> None:
    catalog = load_catalog([{"id": "a", "name": "A"}])
    assert load_catalog(catalog) is catalog


def test_jsonl_file_loads_skipping_blank_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.jsonl",
        '{"id": "US", "name": "United States", "aliases": ["USA"]}\n'
        "\n"
        '{"id": "AT", "name": "Austria", "aliases": ["Österreich"]}\n',
    )
    catalog = load_catalog(path)
    assert [e.id for e in catalog.entities] == ["US", "AT"]
    assert catalog.entities[1].aliases == ["Österreich"]


def test_jsonl_file_with_a_utf8_bom_loads(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "name": "A"}\n')
    assert load_catalog(path).entities[0].id == "a"


def test_csv_file_splits_aliases_on_pipes_and_keeps_other_columns_as_attributes(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "c.csv",
        "id,name,aliases,description,iso3\n"
        "US,United States,USA | America,a country,USA\n"
        "DE,Germany,,,DEU\n",
    )
    us, de = load_catalog(str(path)).entities
    assert us == Entity(
        id="US",
        name="United States",
        aliases=["USA", "America"],
        description="a country",
        attributes={"iso3": "USA"},
    )
    assert de.aliases == [] and de.attributes == {"iso3": "DEU"}


def test_tsv_file_is_read_as_tab_separated(tmp_path: Path) -> None:
    path = write(tmp_path / "c.tsv", "id\tname\taliases\nUS\tUnited States\tUSA|America\n")
    assert load_catalog(path).entities[0].aliases == ["USA", "America"]


def test_csv_line_separator_characters_inside_a_field_stay_data(tmp_path: Path) -> None:
    # U+2028 and U+0085 end a line for str.splitlines but not for CSV
    path = write(
        tmp_path / "c.csv",
        'id,name,description\na,Caf\u0085e,"one\u2028two"\nb,B,plain\n',
    )
    catalog = load_catalog(path)
    assert [e.id for e in catalog.entities] == ["a", "b"]
    assert catalog.entities[0].name == "Caf\u0085e"
    assert catalog.entities[0].description == "one\u2028two"


def test_matcher_accepts_a_catalog_path(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"id": "a", "name": "A"}\n{"id": "b", "name": "B"}\n')
    matcher = Matcher(path, embedder=FakeEmbedder())
    try:
        assert isinstance(matcher.catalog, Catalog) and len(matcher.catalog) == 2
    finally:
        matcher.close()


# -- what is refused, and where it says the problem is -------------------------------------


@pytest.mark.parametrize(
    ("rows", "where", "what"),
    [
        (
            [{"id": "a", "name": "A"}, {"id": "b", "name": "B"}, {"id": "a", "name": "C"}],
            "entities[2]",
            "duplicate id 'a' (first seen at entities[0])",
        ),
        ([{"id": "a", "name": "A"}, {"id": "b"}], "entities[1]", "missing required field 'name'"),
        ([{"id": "a", "name": ""}], "entities[0]", "'name'"),
        ([{"id": "a", "name": "   "}], "entities[0]", "must not be blank"),
        ([{"name": "A"}], "entities[0]", "missing required field 'id'"),
        ([{"id": "a", "name": "A", "aliases": ["x", 3]}], "entities[0]", "alias 1 must be a str"),
        ([{"id": "a", "name": "A", "aliases": "x"}], "entities[0]", "must be a list of strings"),
        ([{"id": "a", "name": "A", "aliases": [" "]}], "entities[0]", "alias 0 is blank"),
        ([{"id": "a", "name": "A"}, "B"], "entities[1]", "expected an object"),
    ],
    ids=[
        "duplicate-id",
        "missing-name",
        "empty-name",
        "blank-name",
        "missing-id",
        "non-string-alias",
        "aliases-not-a-list",
        "blank-alias",
        "not-an-object",
    ],
)
def test_invalid_row_in_a_list_is_named(rows: list[Any], where: str, what: str) -> None:
    with pytest.raises(CatalogError) as info:
        load_catalog(rows)
    assert info.value.source == where
    assert str(info.value).startswith(f"{where}: ")
    assert what in str(info.value)


def test_empty_list_is_rejected() -> None:
    with pytest.raises(CatalogError, match="catalog is empty"):
        load_catalog([])


def test_single_entity_instead_of_a_list_is_rejected() -> None:
    with pytest.raises(CatalogError, match="single entity"):
        load_catalog({"id": "a", "name": "A"})  # type: ignore[arg-type]


def test_overlong_name_is_rejected() -> None:
    with pytest.raises(CatalogError, match=r"entities\[0\].*limit"):
        load_catalog([{"id": "a", "name": "x" * (MAX_FORM_CHARS + 1)}])


def test_duplicate_id_in_a_file_names_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.jsonl",
        '{"id": "a", "name": "A"}\n{"id": "b", "name": "B"}\n{"id": "a", "name": "C"}\n',
    )
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert info.value.line == 3
    assert str(info.value) == f"{path}:3: duplicate id 'a' (first seen at line 1)"


def test_malformed_json_line_is_named_with_its_column(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"id": "a", "name": "A"}\n{"id": "b", "name": "B"\n')
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert info.value.line == 2
    assert str(info.value).startswith(f"{path}:2: malformed JSON")
    assert "(column 24)" in str(info.value)


def test_invalid_row_in_a_file_is_named_by_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"id": "a", "name": "A"}\n\n{"id": "b", "name": ""}\n')
    with pytest.raises(CatalogError, match=r"c\.jsonl:3: field 'name'"):
        load_catalog(path)


def test_invalid_utf8_in_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "name": "A"}\n{"id": "b", "name": "B\xff"}\n')
    with pytest.raises(CatalogError, match=r"c\.jsonl:2: invalid UTF-8") as info:
        load_catalog(path)
    assert info.value.line == 2


def test_invalid_utf8_in_csv_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes(b"id,name\na,A\nb,B\xff\n")
    with pytest.raises(CatalogError, match=r"c\.csv:3: invalid UTF-8"):
        load_catalog(path)


def test_invalid_csv_row_is_named_by_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "id,name\na,A\nb,\n")
    with pytest.raises(CatalogError, match=r"c\.csv:3: field 'name'"):
        load_catalog(path)


def test_csv_without_a_name_column_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "id,label\na,A\n")
    with pytest.raises(CatalogError, match="no 'name' column"):
        load_catalog(path)


def test_file_with_only_blank_lines_is_an_empty_catalog(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", "\n  \n")
    with pytest.raises(CatalogError, match="catalog is empty"):
        load_catalog(path)


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="file not found"):
        load_catalog(tmp_path / "nope.jsonl")


def test_unknown_file_format_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", "a\n")
    with pytest.raises(CatalogError, match="unknown catalog format"):
        load_catalog(path)


def test_catalog_errors_are_value_errors_of_the_package() -> None:
    with pytest.raises(CatalogError) as info:
        load_catalog([])
    assert isinstance(info.value, InputError)
    assert isinstance(info.value, NemLLMError)
    assert isinstance(info.value, ValueError)


def test_matcher_construction_fails_on_an_invalid_catalog_naming_the_row() -> None:
    rows = [{"id": "US", "name": "United States"}, {"id": "US", "name": "USA"}]
    with pytest.raises(CatalogError, match=r"entities\[1\]: duplicate id 'US'"):
        Matcher(rows, embedder=FakeEmbedder())


def test_matcher_construction_fails_on_a_malformed_catalog_file_naming_the_line(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "c.jsonl", '{"id": "a", "name": "A"}\nnot json\n')
    with pytest.raises(CatalogError, match=r"c\.jsonl:2: malformed JSON"):
        Matcher(path, embedder=FakeEmbedder())


def test_unknown_jsonl_fields_become_attributes(tmp_path: Path) -> None:
    path = tmp_path / "places.jsonl"
    path.write_text(
        '{"id": "1", "name": "Canillo", "country": "AD", "type": "parish"}\n'
        '{"id": "2", "name": "Canillo", "country": "FR", "attributes": {"pop": 5}}\n',
        encoding="utf-8",
    )
    catalog = load_catalog(path)
    assert catalog.entities[0].attributes == {"country": "AD", "type": "parish"}
    assert catalog.entities[1].attributes == {"country": "FR", "pop": 5}


def test_columns_map_other_names_onto_id_name_aliases_description(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("code,label,alt,notes,country\nUS,United States,USA;America,a country,NA\n")
    columns = CatalogColumns.parse(
        "id=code,name=label,aliases=alt,description=notes", alias_separator=";"
    )
    (us,) = load_catalog(path, columns=columns).entities
    assert (us.id, us.name, us.aliases, us.description) == (
        "US",
        "United States",
        ["USA", "America"],
        "a country",
    )
    assert us.attributes == {"country": "NA"}
    rows = [{"code": "DE", "label": "Germany", "alt": "Deutschland|BRD"}]
    (de,) = load_catalog(
        rows, columns=CatalogColumns(id="code", name="label", aliases="alt", alias_separator="|")
    ).entities
    assert de.aliases == ["Deutschland", "BRD"]


def test_a_mapped_id_column_missing_from_the_csv_header_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("id,name\n1,a\n")
    with pytest.raises(CatalogError, match="no 'code' column for 'id'"):
        load_catalog(path, columns=CatalogColumns(id="code"))


def test_bad_column_mapping_is_a_clear_error() -> None:
    with pytest.raises(CatalogError, match="bad column mapping 'title'"):
        CatalogColumns.parse("title")
    with pytest.raises(CatalogError, match="distinct"):
        CatalogColumns(id="x", name="x")


def test_where_mask_filters_by_equality_and_membership() -> None:
    catalog = load_catalog(
        [
            {"id": "1", "name": "Canillo", "country": "AD"},
            {"id": "2", "name": "Canillo", "country": "FR", "pop": 5},
            {"id": "3", "name": "Paris", "country": "FR", "pop": "5"},
        ]
    )
    assert catalog.where_mask({"country": "FR"}).tolist() == [False, True, True]
    assert catalog.where_mask({"country": ["AD", "FR"]}).tolist() == [True, True, True]
    assert catalog.where_mask({"country": "FR", "pop": 5}).tolist() == [False, True, True]
    with pytest.raises(ConfigError, match="no entity has"):
        catalog.where_mask({"region": "x"})


def test_a_csv_quote_never_closed_is_refused_naming_its_line(tmp_path: Path) -> None:
    """The csv module would read B's name as "Beta\\nC,Gamma\\nD,Delta": two entities and
    no word. The catalog is refused at the line the quote opened on."""
    path = tmp_path / "c.csv"
    path.write_text('id,name\nA,Alpha\nB,"Beta\nC,Gamma\nD,Delta\n', encoding="utf-8")
    with pytest.raises(CatalogError, match=r"c\.csv:3: a quote opened on this line is never"):
        load_catalog(path)


def test_a_quoted_field_over_several_lines_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text('id,name,description\nA,Alpha,"two\nlines"\nB,"Be""ta\nx"\n', encoding="utf-8")
    got = [(e.id, e.name, e.description) for e in load_catalog(path).entities]
    assert got == [("A", "Alpha", "two\nlines"), ("B", 'Be"ta\nx', "")]
