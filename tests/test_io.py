"""Tests for nem_llm._jobs.io: streaming query readers, results writer and tail repair."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

import nem_llm._jobs.io._lines as nio_lines
from nem_llm._jobs.io import (
    AtomicLineWriter,
    QueryRow,
    count_rows,
    read_jsonl_rows,
    read_queries,
    repair_jsonl_tail,
)
from nem_llm.errors import ConfigError, InputError


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def jsonl(path: Path, *rows: object) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def summary(rows: list[QueryRow]) -> list[tuple[int, int, str, str | None, str | None]]:
    return [(r.index, r.line, r.id, r.query, r.error) for r in rows]


# --------------------------------------------------------------------------- happy paths


def test_jsonl_rows_carry_ids_queries_and_records(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "q.jsonl",
        {"id": "a", "query": "USA", "gold_id": "US"},
        {"id": 7, "query": "Deutschland"},
    )
    rows = list(read_queries(path))
    assert summary(rows) == [(0, 1, "a", "USA", None), (1, 2, "7", "Deutschland", None)]
    assert rows[0].record == {"id": "a", "query": "USA", "gold_id": "US"}
    assert rows[0].ok


def test_jsonl_query_field_defaults_to_first_known_name(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.ndjson", {"name": "n", "text": "t"})
    assert [r.query for r in read_queries(path)] == ["t"]


def test_jsonl_explicit_columns_are_used(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"key": "k1", "mention": "m", "query": "ignored"})
    rows = list(read_queries(path, query_column="mention", id_column="key"))
    assert summary(rows) == [(0, 1, "k1", "m", None)]


def test_rows_without_id_column_get_their_index_as_id(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"query": "a"}, {"query": "b"})
    assert [r.id for r in read_queries(path)] == ["0", "1"]


def test_csv_handles_quoted_commas_and_embedded_newlines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "q.csv",
        "id,text,gold_id\n"
        'q1,"arnie mortons of chicago, 435 s. la cienega",E1\n'
        'q2,"two\nlines",E2\n'
        'q3,"say ""hi""",E3\n',
    )
    rows = list(read_queries(path, query_column="text", id_column="id"))
    assert summary(rows) == [
        (0, 2, "q1", "arnie mortons of chicago, 435 s. la cienega", None),
        (1, 3, "q2", "two\nlines", None),
        (2, 5, "q3", 'say "hi"', None),
    ]
    assert rows[1].record == {"id": "q2", "text": "two\nlines", "gold_id": "E2"}


def test_csv_with_crlf_line_endings(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", 'id,query\r\nq1,a\r\nq2,"b\r\nc"\r\n')
    assert summary(list(read_queries(path))) == [
        (0, 2, "q1", "a", None),
        (1, 3, "q2", "b\r\nc", None),
    ]


def test_tsv_is_split_on_tabs(tmp_path: Path) -> None:
    path = write(tmp_path / "q.tsv", "id\tquery\nq1\tAcme, Inc.\n")
    assert summary(list(read_queries(path))) == [(0, 2, "q1", "Acme, Inc.", None)]


def test_txt_yields_one_query_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "q.txt", "USA\r\nDeutschland\n")
    rows = list(read_queries(path))
    assert summary(rows) == [(0, 1, "0", "USA", None), (1, 2, "1", "Deutschland", None)]
    assert rows[0].record is None


def test_blank_lines_are_skipped_and_take_no_index(tmp_path: Path) -> None:
    path = write(tmp_path / "q.jsonl", '{"query": "a"}\n\n   \n{"query": "b"}\n')
    assert summary(list(read_queries(path))) == [(0, 1, "0", "a", None), (1, 4, "1", "b", None)]


def test_utf8_bom_is_stripped_from_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "q.jsonl", b'\xef\xbb\xbf{"query": "a"}\n')
    assert [r.query for r in read_queries(path)] == ["a"]


def test_utf8_bom_is_stripped_from_csv_header(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", b"\xef\xbb\xbfid,query\nq1,a\n")
    assert summary(list(read_queries(path))) == [(0, 2, "q1", "a", None)]


def test_csv_header_only_yields_nothing(tmp_path: Path) -> None:
    assert list(read_queries(write(tmp_path / "q.csv", "id,query\n"))) == []


# --------------------------------------------------------------------------- row errors


def test_malformed_json_line_is_a_row_error_and_reading_continues(tmp_path: Path) -> None:
    path = write(tmp_path / "q.jsonl", '{"query": "a"}\n{"query": }\n{"query": "c"}\n')
    assert summary(list(read_queries(path))) == [
        (0, 1, "0", "a", None),
        (1, 2, "1", None, "malformed JSON: Expecting value (column 11)"),
        (2, 3, "2", "c", None),
    ]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("[" * 100_000, "malformed JSON: nested too deeply"),
        (
            '{"query": ' + "1" * 5000 + "}",
            "malformed JSON: Exceeds the limit (4300 digits) for integer string conversion",
        ),
    ],
)
def test_json_the_parser_cannot_handle_is_a_row_error(
    tmp_path: Path, line: str, error: str
) -> None:
    path = write(tmp_path / "q.jsonl", '{"query": "a"}\n' + line + '\n{"query": "c"}\n')
    assert summary(list(read_queries(path))) == [
        (0, 1, "0", "a", None),
        (1, 2, "1", None, error),
        (2, 3, "2", "c", None),
    ]


def test_json_that_is_not_an_object_is_a_row_error(tmp_path: Path) -> None:
    path = write(tmp_path / "q.jsonl", '{"query": "a"}\n["b"]\n{"query": "c"}\n')
    rows = list(read_queries(path))
    assert (rows[1].index, rows[1].line, rows[1].error) == (
        1,
        2,
        "expected a JSON object, got list",
    )
    assert rows[2].query == "c"


def test_missing_query_field_is_a_row_error(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"query": "a"}, {"other": 1, "gold_id": "G"}, {"query": "c"})
    rows = list(read_queries(path))
    assert summary(rows)[1:] == [
        (1, 2, "1", None, "missing query field 'query'"),
        (2, 3, "2", "c", None),
    ]
    assert rows[1].record == {"other": 1, "gold_id": "G"}


@pytest.mark.parametrize(
    ("value", "kind"), [(5, "int"), (None, "null"), (["x"], "list"), (True, "bool")]
)
def test_non_string_query_is_a_row_error(tmp_path: Path, value: object, kind: str) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"query": "a"}, {"query": value}, {"query": "c"})
    rows = list(read_queries(path))
    assert rows[1].error == f"query is not a string (got {kind})"
    assert rows[1].query is None
    assert rows[2].query == "c"


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_empty_or_whitespace_query_is_a_row_error(tmp_path: Path, value: str) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"query": "a"}, {"query": value}, {"query": "c"})
    assert summary(list(read_queries(path)))[1:] == [
        (1, 2, "1", None, "empty query"),
        (2, 3, "2", "c", None),
    ]


def test_empty_csv_query_is_a_row_error(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "id,query\nq1,\nq2,b\n")
    assert summary(list(read_queries(path))) == [
        (0, 2, "q1", None, "empty query"),
        (1, 3, "q2", "b", None),
    ]


def test_query_over_the_limit_is_a_row_error(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"query": "x" * 11}, {"query": "ok"})
    assert summary(list(read_queries(path, max_query_chars=10))) == [
        (0, 1, "0", None, "query is 11 characters (limit 10)"),
        (1, 2, "1", "ok", None),
    ]


def test_one_megabyte_jsonl_query_is_a_row_error(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"query": "x" * 1_048_577}, {"query": "ok"})
    assert summary(list(read_queries(path))) == [
        (0, 1, "0", None, "query is 1,048,577 characters (limit 100,000)"),
        (1, 2, "1", "ok", None),
    ]


def test_one_megabyte_csv_field_is_a_row_error(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", f"id,query\nq1,{'x' * 1_048_576}\nq2,ok\n")
    rows = list(read_queries(path))
    assert (rows[0].index, rows[0].line, rows[0].query) == (0, 2, None)
    assert rows[0].error == (
        "a field is longer than 131,072 characters (the csv module's field_size_limit)"
    )
    assert summary(rows)[1] == (1, 3, "q2", "ok", None)


def test_huge_multiline_quoted_csv_field_is_skipped_to_its_end(tmp_path: Path) -> None:
    big = "\n".join(["y" * 1000] * 300)  # 300 lines, ~300k characters, inside quotes
    path = write(tmp_path / "q.csv", f'id,query\nq1,"{big}"\nq2,ok\n')
    rows = list(read_queries(path))
    assert [(r.index, r.line, r.error is None) for r in rows] == [(0, 2, False), (1, 302, True)]
    assert rows[1].query == "ok"


def test_invalid_utf8_jsonl_line_is_a_row_error_that_keeps_its_id(tmp_path: Path) -> None:
    path = write(
        tmp_path / "q.jsonl",
        b'{"id": "a", "query": "x"}\n{"id": "b", "query": "caf\xe9"}\n{"id": "c", "query": "z"}\n',
    )
    rows = list(read_queries(path))
    assert summary(rows) == [
        (0, 1, "a", "x", None),
        (1, 2, "b", None, "invalid UTF-8 at byte 25"),
        (2, 3, "c", "z", None),
    ]
    assert rows[1].record is None


def test_invalid_utf8_in_middle_csv_row_only_errors_that_row(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", b"id,query\nq1,a\nq2,caf\xe9\nq3,c\n")
    assert summary(list(read_queries(path))) == [
        (0, 2, "q1", "a", None),
        (1, 3, "q2", None, "invalid UTF-8 at byte 6"),
        (2, 4, "q3", "c", None),
    ]


def test_invalid_utf8_on_a_later_line_of_a_csv_record_names_that_line(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", b'id,query\nq1,"a\nb\xff"\nq2,c\n')
    assert summary(list(read_queries(path))) == [
        (0, 2, "q1", None, "invalid UTF-8 at byte 1 of line 3"),
        (1, 4, "q2", "c", None),
    ]


def test_encoding_errors_replace_keeps_the_row(tmp_path: Path) -> None:
    path = write(tmp_path / "q.txt", b"caf\xe9\n")
    assert [r.query for r in read_queries(path, encoding_errors="replace")] == ["caf\ufffd"]


def test_encoding_errors_raise_is_fatal(tmp_path: Path) -> None:
    path = write(tmp_path / "q.txt", b"ok\ncaf\xe9\n")
    rows = read_queries(path, encoding_errors="raise")
    assert next(rows).query == "ok"
    with pytest.raises(InputError, match=r"q\.txt:2: invalid UTF-8 at byte 3"):
        next(rows)


def test_duplicate_ids_error_on_second_and_later_rows(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "q.jsonl",
        {"id": "q1", "query": "a"},
        {"id": "q7", "query": "b"},
        {"id": "q7", "query": "c"},
        {"id": "q7", "query": "d"},
        {"id": "q8", "query": "e"},
    )
    assert summary(list(read_queries(path))) == [
        (0, 1, "q1", "a", None),
        (1, 2, "q7", "b", None),
        (2, 3, "q7", None, "duplicate id 'q7' (first seen at line 2)"),
        (3, 4, "q7", None, "duplicate id 'q7' (first seen at line 2)"),
        (4, 5, "q8", "e", None),
    ]


def test_missing_id_in_a_later_object_is_a_row_error(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"id": "a", "query": "x"}, {"query": "y"})
    assert summary(list(read_queries(path)))[1] == (1, 2, "1", None, "missing id field 'id'")


def test_csv_row_with_wrong_field_count_is_a_row_error(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "id,query\nq1,a\nq2,b,extra\nq3\nq4,d\n")
    assert summary(list(read_queries(path))) == [
        (0, 2, "q1", "a", None),
        (1, 3, "1", None, "expected 2 fields, got 3"),
        (2, 4, "2", None, "expected 2 fields, got 1"),
        (3, 5, "q4", "d", None),
    ]


NEVER_CLOSED = (
    "a quote opened on this line is never closed (a stray quote?); "
    "reading goes on with the next line"
)


def test_csv_unterminated_quote_is_a_row_error_and_the_lines_after_it_are_rows(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "q.csv", 'id,query\nq1,a\nq2,"open\nq3,c\n')
    assert summary(list(read_queries(path))) == [
        (0, 2, "q1", "a", None),
        (1, 3, "1", None, NEVER_CLOSED),
        (2, 4, "q3", "c", None),
    ]


def test_csv_unterminated_quote_loses_no_line_and_agrees_with_count_rows(tmp_path: Path) -> None:
    lines = [f"q{i:02d}," + ('"haskel' if i == 8 else f"query {i}") for i in range(15)]
    path = write(tmp_path / "q.csv", "id,query\n" + "\n".join(lines) + "\n")
    rows = list(read_queries(path))
    assert len(rows) == count_rows(path) == 15
    assert [r.line for r in rows] == list(range(2, 17))
    assert [r.id for r in rows if r.ok] == [f"q{i:02d}" for i in range(15) if i != 8]
    assert (rows[8].line, rows[8].error) == (10, NEVER_CLOSED)


def test_csv_unterminated_quote_on_the_last_line_is_one_error_row(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", 'id,query\nq1,a\nq2,"open')
    assert summary(list(read_queries(path)))[1] == (
        1,
        3,
        "1",
        None,
        "a quote opened on this line is never closed (a stray quote?)",
    )


def test_csv_stray_quote_closed_inside_a_later_field_loses_no_line(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", 'id,query\nq1,"hask\nq2,b\nq3,"c" d\nq4,e\n')
    assert summary(list(read_queries(path))) == [
        (
            0,
            2,
            "0",
            None,
            "a quote opened on this line closes on line 4 in the middle of a "
            "field (a stray quote?); reading goes on with the next line",
        ),
        (1, 3, "q2", "b", None),
        (2, 4, "q3", "c d", None),
        (3, 5, "q4", "e", None),
    ]


def test_csv_quote_closed_then_text_on_one_line_is_read_leniently(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", 'id,query\nq1,"ab"c\nq2,d\n')
    assert summary(list(read_queries(path))) == [
        (0, 2, "q1", "abc", None),
        (1, 3, "q2", "d", None),
    ]


def test_csv_record_of_several_lines_with_wrong_field_count_names_its_lines(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "q.csv", 'id,query\nq1,"a\nb",x\nq2,d\n')
    assert summary(list(read_queries(path)))[0] == (
        0,
        2,
        "0",
        None,
        "expected 2 fields, got 3 (the record runs from line 2 to line 3)",
    )


def test_csv_unterminated_quote_in_the_header_is_fatal_naming_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", 'id,"query\nq1,a\n')
    never_closed = r"q\.csv:1: unreadable CSV header: a quote that is never closed"
    with pytest.raises(InputError, match=never_closed):
        read_queries(path)


def test_csv_carriage_return_in_unquoted_field_is_a_row_error(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "id,query\nq1,a\rb\nq2,ok\n")
    assert summary(list(read_queries(path))) == [
        (0, 2, "0", None, "unreadable CSV record: a line break (\\r) inside an unquoted field"),
        (1, 3, "q2", "ok", None),
    ]


def test_jsonl_schema_comes_from_the_first_object_not_the_first_line(tmp_path: Path) -> None:
    path = write(tmp_path / "q.jsonl", '[1]\n{"id": "x", "text": "t"}\n')
    assert summary(list(read_queries(path))) == [
        (0, 1, "0", None, "expected a JSON object, got list"),
        (1, 2, "x", "t", None),
    ]


def test_over_long_line_is_a_row_error_and_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nio_lines, "MAX_LINE_BYTES", 64)
    path = write(tmp_path / "q.txt", "a\n" + "x" * 500 + "\nb\n")
    assert summary(list(read_queries(path, max_query_chars=1))) == [
        (0, 1, "0", "a", None),
        (1, 2, "1", None, "line is longer than 64 bytes"),
        (2, 3, "2", "b", None),
    ]


# --------------------------------------------------------------------------- fatal errors


def test_missing_file_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match="file not found") as info:
        read_queries(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)


def test_unknown_extension_is_fatal(tmp_path: Path) -> None:
    path = write(tmp_path / "q.xlsx", "x")
    with pytest.raises(InputError, match=r"unknown file extension '\.xlsx'") as info:
        read_queries(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["q.jsonl", "q.csv", "q.txt"])
@pytest.mark.parametrize("content", [b"", b"\n  \n", b"\xef\xbb\xbf"])
def test_empty_file_is_fatal(tmp_path: Path, name: str, content: bytes) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(InputError) as info:
        read_queries(path)
    assert str(info.value) == f"{path}:1: file is empty"


def test_csv_header_without_configured_query_column_is_fatal(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "\na,b,c\n1,2,3\n")
    with pytest.raises(InputError) as info:
        read_queries(path, query_column="text")
    assert str(info.value) == f"{path}:2: no column 'text' in header (found: a, b, c)"


def test_csv_header_without_any_default_query_column_is_fatal(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "a,b\n1,2\n")
    with pytest.raises(InputError, match=r"q\.csv:1: no query column in header") as info:
        read_queries(path)
    assert "found: a, b" in str(info.value)


def test_csv_header_without_configured_id_column_is_fatal(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "key,query\n1,a\n")
    with pytest.raises(InputError) as info:
        read_queries(path, id_column="id")
    assert str(info.value) == f"{path}:1: no id column 'id' in header (found: key, query)"


def test_jsonl_whose_first_line_is_not_json_is_fatal(tmp_path: Path) -> None:
    path = write(tmp_path / "q.jsonl", '\nid,query\n{"query": "a"}\n')
    with pytest.raises(InputError) as info:
        read_queries(path)
    assert str(info.value) == (
        f"{path}:2: not a JSONL file: the first line is not JSON (Expecting value (column 1))"
    )


def test_jsonl_first_object_without_configured_query_field_is_fatal(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"id": 1, "q": "a"})
    with pytest.raises(InputError) as info:
        read_queries(path, query_column="text")
    assert str(info.value) == f"{path}:1: no field 'text' in the first object (found: id, q)"


def test_fatal_errors_surface_when_called_not_when_iterated(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "a,b\n" + "1,2\n" * 10)
    with pytest.raises(InputError):
        read_queries(path)  # no iteration needed


@pytest.mark.parametrize("kwargs", [{"max_query_chars": 0}, {"encoding_errors": "ignore"}])
def test_bad_options_raise_config_error(tmp_path: Path, kwargs: dict[str, object]) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"query": "a"})
    with pytest.raises(ConfigError):
        read_queries(path, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- streaming


def test_first_row_of_a_huge_file_is_read_without_reading_the_file(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    line = b'{"id": "q%d", "query": "some mention text of a typical length"}\n'
    block = b"".join(line % i for i in range(10_000))
    with path.open("wb") as fh:
        for _ in range(200):  # 2 million lines, ~130 MB
            fh.write(block)
    tracemalloc.start()
    try:
        rows = read_queries(path)
        first = next(rows)
        rows.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.id == "q0"
    assert peak < 2 * 1024 * 1024


def test_closing_the_reader_early_closes_the_file(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", {"query": "a"}, {"query": "b"})
    rows = read_queries(path)
    assert next(rows).query == "a"
    rows.close()  # no ResourceWarning (filterwarnings=error would turn it into a failure)
    assert list(rows) == []


# --------------------------------------------------------------------------- count_rows


def test_count_rows_counts_lines_of_jsonl(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", *({"query": str(i)} for i in range(5)))
    assert count_rows(path) == 5


def test_count_rows_subtracts_the_csv_header(tmp_path: Path) -> None:
    assert count_rows(write(tmp_path / "q.csv", "id,query\nq1,a\nq2,b\n")) == 2


def test_count_rows_counts_a_last_line_without_newline(tmp_path: Path) -> None:
    assert count_rows(write(tmp_path / "q.txt", "a\nb")) == 2


def test_count_rows_of_a_header_only_csv_is_zero(tmp_path: Path) -> None:
    assert count_rows(write(tmp_path / "q.csv", "id,query")) == 0


def test_count_rows_of_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        count_rows(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- writer and tail


def test_writer_writes_one_json_line_per_row(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with AtomicLineWriter(path, append=False) as out:
        assert out.write({"id": "q1", "name": "Zürich"}) == len(
            '{"id": "q1", "name": "Zürich"}\n'.encode()
        )
        out.write({"id": "q2", "text": "a\nb"})
    assert (
        path.read_text("utf-8") == '{"id": "q1", "name": "Zürich"}\n{"id": "q2", "text": "a\\nb"}\n'
    )
    assert out.closed
    assert out.rows_written == 2


def test_writer_append_keeps_existing_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", '{"id": "q1"}\n')
    with AtomicLineWriter(path, append=True, fsync=True) as out:
        out.write({"id": "q2"})
    assert [row["id"] for _, row in read_jsonl_rows(path)] == ["q1", "q2"]


def test_writer_without_append_truncates(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", '{"id": "old"}\n')
    with AtomicLineWriter(path, append=False) as out:
        out.write({"id": "new"})
    assert path.read_text() == '{"id": "new"}\n'


def test_writer_rejects_nan_without_writing_anything(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with AtomicLineWriter(path, append=False) as out, pytest.raises(ValueError):
        out.write({"score": float("nan")})
    assert path.read_bytes() == b""


def test_writer_refuses_to_write_after_close(tmp_path: Path) -> None:
    out = AtomicLineWriter(tmp_path / "out.jsonl", append=False)
    out.close()
    out.close()
    with pytest.raises(ValueError, match="closed"):
        out.write({"id": 1})


def test_repair_cuts_a_torn_last_line_and_returns_bytes_removed(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", '{"id": "q1"}\n{"id": "q2"}\n{"id": "q')
    assert repair_jsonl_tail(path) == len('{"id": "q')
    assert path.read_text() == '{"id": "q1"}\n{"id": "q2"}\n'


def test_repair_cuts_a_last_line_that_is_not_json(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", '{"id": "q1"}\n{"id": \n')
    assert repair_jsonl_tail(path) == len('{"id": \n')
    assert path.read_text() == '{"id": "q1"}\n'


def test_repair_cuts_a_torn_only_line(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", '{"id"')
    assert repair_jsonl_tail(path) == 5
    assert path.read_bytes() == b""


def test_repair_leaves_a_clean_file_alone(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", '{"id": "q1"}\n{"id": "q2"}\n')
    assert repair_jsonl_tail(path) == 0
    assert path.read_text() == '{"id": "q1"}\n{"id": "q2"}\n'


def test_repair_of_a_missing_file_removes_nothing(tmp_path: Path) -> None:
    assert repair_jsonl_tail(tmp_path / "out.jsonl") == 0


def test_repair_then_append_gives_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with AtomicLineWriter(path, append=False) as out:
        out.write({"id": "q1"})
    with path.open("ab") as fh:  # a crash mid-write
        fh.write(b'{"id": "q2", "sta')
    repair_jsonl_tail(path)
    with AtomicLineWriter(path, append=True) as out:
        out.write({"id": "q2"})
    assert [(n, r["id"]) for n, r in read_jsonl_rows(path)] == [(1, "q1"), (2, "q2")]


# --------------------------------------------------------------------------- read_jsonl_rows


def test_read_jsonl_rows_yields_line_numbers_and_dicts(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", '{"id": "q1"}\n\n{"id": "q2"}\n')
    assert list(read_jsonl_rows(path)) == [(1, {"id": "q1"}), (3, {"id": "q2"})]


@pytest.mark.parametrize("tail", ['{"id": "q2"', '{"id": "q2"}', "[1]\n", '{"id": \n'])
def test_read_jsonl_rows_skips_what_repair_would_remove(tmp_path: Path, tail: str) -> None:
    path = write(tmp_path / "out.jsonl", '{"id": "q1"}\n' + tail)
    assert list(read_jsonl_rows(path)) == [(1, {"id": "q1"})]


def test_read_jsonl_rows_raises_on_a_bad_line_before_the_last(tmp_path: Path) -> None:
    path = write(tmp_path / "out.jsonl", '{"id": "q1"}\n{"id": \n{"id": "q3"}\n')
    rows = read_jsonl_rows(path)
    assert next(rows) == (1, {"id": "q1"})
    with pytest.raises(InputError) as info:
        next(rows)
    assert str(info.value) == f"{path}:2: malformed JSON: Expecting value (column 8)"


def test_read_jsonl_rows_of_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_jsonl_rows(tmp_path / "out.jsonl")


# --------------------------------------------------------------------------- formats users have


def parquet(path: Path, rows: list[dict[str, object]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_queries_are_rows_like_any_other_format(tmp_path: Path) -> None:
    path = parquet(
        tmp_path / "q.parquet",
        [
            {"id": "q1", "query": "USA", "country": "US"},
            {"id": "q2", "query": "  ", "country": None},
            {"id": "q1", "query": "Deutschland", "country": "DE"},
        ],
    )
    rows = list(read_queries(path))
    assert summary(rows) == [
        (0, 1, "q1", "USA", None),
        (1, 2, "q2", None, "empty query"),
        (2, 3, "q1", None, "duplicate id 'q1' (first seen at line 1)"),
    ]
    assert rows[0].record == {"id": "q1", "query": "USA", "country": "US"}
    assert count_rows(path) == 3


def test_parquet_without_the_query_column_is_fatal_naming_the_flag(tmp_path: Path) -> None:
    path = parquet(tmp_path / "q.parquet", [{"id": "q1", "label": "USA"}])
    with pytest.raises(InputError, match=r"no query column in the Parquet schema.*--query-column"):
        read_queries(path)


def test_a_file_that_is_not_parquet_is_fatal(tmp_path: Path) -> None:
    path = write(tmp_path / "q.parquet", "id,query\nq1,a\n")
    with pytest.raises(InputError, match=r"q\.parquet: not a readable Parquet file"):
        read_queries(path)


def test_parquet_without_pyarrow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    path = parquet(tmp_path / "q.parquet", [{"query": "a"}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"needs pyarrow: pip install 'nem_llm\[frames\]'"):
        read_queries(path)


def test_semicolon_csv_is_sniffed_from_its_header(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", 'id;query;note\nq1;"a; b";x\nq2;c,d;y\n')
    rows = list(read_queries(path))
    assert summary(rows) == [(0, 2, "q1", "a; b", None), (1, 3, "q2", "c,d", None)]


def test_an_explicit_delimiter_wins_over_sniffing(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "id:query\nq1:a;b;c\n")
    assert summary(list(read_queries(path, delimiter=":"))) == [(0, 2, "q1", "a;b;c", None)]


def test_a_delimiter_must_be_one_character(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "id,query\nq1,a\n")
    with pytest.raises(ConfigError, match="delimiter must be one character"):
        read_queries(path, delimiter="::")


def test_missing_query_column_names_the_flag_and_hints_at_the_delimiter(tmp_path: Path) -> None:
    path = write(tmp_path / "q.csv", "id:text\nq1:a\n")
    with pytest.raises(InputError) as info:
        read_queries(path)
    message = str(info.value)
    assert "q.csv:1: no query column in header" in message
    assert "--query-column" in message
    assert "--delimiter" in message and "one column" in message


def test_missing_query_column_with_several_columns_does_not_blame_the_delimiter(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "q.csv", "id,label\nq1,a\n")
    with pytest.raises(InputError, match="--query-column") as info:
        read_queries(path)
    assert "--delimiter" not in str(info.value)


def test_semicolon_csv_catalog_loads(tmp_path: Path) -> None:
    from nem_llm.catalog import load_catalog

    path = write(tmp_path / "c.csv", "id;name;aliases\nUS;United States;USA|America\n")
    catalog = load_catalog(path)
    assert catalog.entities[0].aliases == ["USA", "America"]


def test_catalog_alias_separator_splits_other_separators(tmp_path: Path) -> None:
    from nem_llm.catalog import CatalogColumns, load_catalog

    path = write(tmp_path / "c.csv", "id,name,aliases\npy,Python,CPython;py3\n")
    assert load_catalog(path).entities[0].aliases == ["CPython;py3"]
    columns = CatalogColumns(alias_separator=";")
    assert load_catalog(path, columns=columns).entities[0].aliases == ["CPython", "py3"]


def test_parquet_catalog_loads_lists_strings_and_typed_attributes(tmp_path: Path) -> None:
    from nem_llm.catalog import load_catalog

    path = parquet(
        tmp_path / "c.parquet",
        [
            {"id": 1, "name": "Python", "aliases": "CPython|py3", "year": 1991, "note": None},
            {"id": 2, "name": "Rust", "aliases": None, "year": 2015, "note": "systems"},
        ],
    )
    catalog = load_catalog(path)
    assert [e.id for e in catalog.entities] == ["1", "2"]
    assert catalog.entities[0].aliases == ["CPython", "py3"]
    assert catalog.entities[0].attributes == {"year": 1991}
    assert catalog.entities[1].attributes == {"year": 2015, "note": "systems"}


def test_parquet_catalog_row_errors_name_the_row(tmp_path: Path) -> None:
    from nem_llm.catalog import load_catalog
    from nem_llm.errors import CatalogError

    path = parquet(tmp_path / "c.parquet", [{"id": "a", "name": "A"}, {"id": "a", "name": "B"}])
    with pytest.raises(CatalogError, match=r"c\.parquet:2: duplicate id 'a'"):
        load_catalog(path)


def test_parquet_writer_fits_one_schema_to_every_row(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from nem_llm._parquet import write_parquet_rows

    rows = [
        {"id": "a", "error": None, "usage": {}, "candidates": [{}], "score": 1},
        {"id": "b", "error": "x", "usage": {"tokens": 3}, "candidates": [], "score": 0.5},
    ]
    assert write_parquet_rows(tmp_path / "r.parquet", lambda: iter(rows)) == 2
    assert pq.read_table(tmp_path / "r.parquet").to_pylist() == [
        {"id": "a", "error": None, "usage": None, "candidates": [None], "score": 1.0},
        {"id": "b", "error": "x", "usage": {"tokens": 3}, "candidates": [], "score": 0.5},
    ]
    assert not (tmp_path / "r.parquet.tmp").exists()
