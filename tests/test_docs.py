"""The docs cannot rot: README.md and every page of docs/ are checked against the code.

How a page marks its code blocks (docs/index.md tells readers the same):

- ```` ```python title="tested" ```` runs here. A page's tested blocks run in order in one
  namespace (a later block may use what an earlier one defined), in a temporary working
  directory, with ``nem_llm.testing.FakeEmbedder`` in place of the default encoder and
  ``OPENAI_BASE_URL`` pointing at the simulator (``nem_llm.sim``, on 127.0.0.1), so a
  block written as a user writes it runs fast and offline. A tested block followed by a
  ```` ```text title="output" ```` block must print exactly that.
- ```` ```python title="illustration" ```` is not run (it needs a service, Ray, a real
  provider or a large file), but it must parse and every ``nem_llm`` name it imports must
  exist.
- Every other python block is an error: each example says which of the two it is.
- Every ``nem-llm ...`` command in a ``bash`` block names a real command, real options
  (none hidden, i.e. deprecated) and valid choices.

A small collector rather than pytest-examples or mktestdocs: both run blocks as they
stand, while these need a per-page shared namespace, a swapped-in encoder and a running
simulator, and the CLI checks need the typer app itself; the collector is ~200 lines and
adds no dependency to the test command.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import io
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer

import nem_llm
import nem_llm.matcher
from nem_llm.cli import app
from nem_llm.sim import SimConfig, run_simulator
from nem_llm.testing import FakeEmbedder

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TESTED, ILLUSTRATION, OUTPUT = "tested", "illustration", "output"
README_MAX_LINES = 300


@dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown page."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    title: str | None
    source: str

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


_FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_TITLE = re.compile(r'title="(?P<title>[^"]*)"')


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page`` (indented ones, in admonitions or tabs, too)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        lang = info.split()[0].lstrip("{.").rstrip("}") if info else ""
        title = _TITLE.search(info)
        out.append(Block(page, i + 1, lang, title["title"] if title else None, "\n".join(body)))
        i = j + 1
    return out


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ------------------------------------------------------------------ every block is marked


def test_the_collector_finds_tested_blocks_on_most_pages() -> None:
    """Guards the checks below against a marker typo that would make them vacuous."""
    tested = [b for page in PAGES for b in blocks(page) if b.title == TESTED]
    assert len(tested) >= 15
    assert len({b.page for b in tested}) >= 8


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_python_block_says_whether_it_runs(page: Path) -> None:
    unmarked = [
        b.where
        for b in blocks(page)
        if b.lang in ("python", "py") and b.title not in (TESTED, ILLUSTRATION)
    ]
    assert unmarked == [], f'mark each as title="{TESTED}" or title="{ILLUSTRATION}"'


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_an_output_block_follows_a_tested_block(page: Path) -> None:
    found = blocks(page)
    for before, block in zip([None, *found], found, strict=False):
        if block.title == OUTPUT:
            assert before is not None and before.title == TESTED, (
                f"{block.where}: an output block checks the tested block just before it"
            )


# ------------------------------------------------------------------ tested blocks run


@pytest.fixture(scope="module")
def simulator() -> Iterator[str]:
    """The OpenAI-compatible simulator: answers with the top candidate (it is no model)."""
    with run_simulator(SimConfig()) as sim:
        yield sim.base_url


@pytest.fixture
def docs_env(simulator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_BASE_URL", simulator)
    monkeypatch.setenv("OPENAI_API_KEY", "sim")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(nem_llm.matcher, "make_embedder", lambda *_a, **_k: FakeEmbedder())
    yield


def _tested(page: Path) -> list[tuple[Block, Block | None]]:
    """The tested blocks of a page, each with the output block that follows it, if any."""
    found = blocks(page)
    pairs = []
    for n, block in enumerate(found):
        if block.title == TESTED:
            after = found[n + 1] if n + 1 < len(found) else None
            pairs.append((block, after if after is not None and after.title == OUTPUT else None))
    return pairs


PAGES_WITH_TESTED = [p for p in PAGES if _tested(p)]


def run_tested(page: Path) -> None:
    """Run the page's tested blocks in order in one namespace; check their outputs."""
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for block, expected in _tested(page):
        code = compile(block.source, block.where, "exec")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
        if expected is not None:
            assert printed.getvalue().strip() == expected.source.strip(), (
                f"{block.where} printed {printed.getvalue()!r}, not what its output block says"
            )


@pytest.mark.usefixtures("docs_env")
@pytest.mark.parametrize("page", PAGES_WITH_TESTED, ids=page_id)
def test_tested_blocks_run(page: Path) -> None:
    run_tested(page)


def test_an_output_block_that_differs_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        '```python title="tested"\nx = 2\nprint(x)\n```\n\n'
        '```python title="tested"\nprint(x + 1)\n```\n'
        '```text title="output"\n4\n```\n',
        encoding="utf-8",
    )
    with pytest.raises(AssertionError, match="printed '3"):
        run_tested(page)


# ------------------------------------------------------------------ illustrations


def _nem_llm_imports(tree: ast.AST) -> Iterator[tuple[str, str | None]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nem_llm"):
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("nem_llm"):
                    yield alias.name, None


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_illustrations_parse_and_import_real_names(page: Path) -> None:
    for block in blocks(page):
        if block.title != ILLUSTRATION:
            continue
        tree = ast.parse(block.source, block.where)
        for module, name in _nem_llm_imports(tree):
            imported = importlib.import_module(module)
            if name is not None:
                assert hasattr(imported, name), f"{block.where}: {module} has no {name}"


# ------------------------------------------------------------------ the CLI in bash blocks


def _commands(source: str) -> Iterator[list[str]]:
    """Each ``nem-llm ...`` invocation of a shell block, as argv after ``nem-llm``."""
    text = source.replace("\\\n", " ")
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote inside a comment: take the code part only
            words = shlex.split(line.split(" #")[0], comments=True)
        segment: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", "|", ";", "&"):
                if segment and segment[0] == "nem-llm":
                    yield segment[1:]
                segment = []
            else:
                segment.append(word)


@functools.cache
def _root_command() -> Any:
    return typer.main.get_command(app)


def _resolve(argv: list[str]) -> tuple[Any, list[str], str]:
    """The (click-like) command an argv names, the words left, and its path."""
    command: Any = _root_command()
    path = "nem-llm"
    rest = list(argv)
    while isinstance(getattr(command, "commands", None), dict) and rest:
        name = rest.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"{path} has no command {name!r}"
        command, path = sub, f"{path} {name}"
    return command, rest, path


def _choices(param: Any) -> tuple[str, ...] | None:
    """A parameter's choices (typer 0.29 keeps them on ``type_descriptor``; click on ``type``)."""
    for holder in (getattr(param, "type_descriptor", None), getattr(param, "type", None)):
        choices = getattr(holder, "choices", None)
        if choices:
            return tuple(str(c) for c in choices)
    return None


def _check_invocation(argv: list[str]) -> None:
    command, rest, path = _resolve(argv)
    options: dict[str, Any] = {}
    for param in command.params:
        for opt in (*param.opts, *param.secondary_opts):
            options[opt] = param
    for n, word in enumerate(rest):
        if not word.startswith("-") or word in ("-", "--"):
            continue
        flag = word.split("=", 1)[0]
        param = options.get(flag)
        assert param is not None, f"{path} has no option {flag}"
        assert not getattr(param, "hidden", False), f"{path} {flag} is deprecated (hidden)"
        value = word.split("=", 1)[1] if "=" in word else None
        if value is None and n + 1 < len(rest) and not rest[n + 1].startswith("-"):
            value = rest[n + 1]
        choices = _choices(param)
        if choices is not None and value is not None:
            assert value in choices, f"{path} {flag} {value!r}: not a choice"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_cli_commands_name_real_commands_and_options(page: Path) -> None:
    for block in blocks(page):
        if block.lang not in ("bash", "sh", "console"):
            continue
        for argv in _commands(block.source):
            try:
                _check_invocation(argv)
            except AssertionError as exc:
                raise AssertionError(f"{block.where}: nem-llm {shlex.join(argv)}: {exc}") from None


def test_the_cli_check_catches_a_renamed_flag() -> None:
    with pytest.raises(AssertionError, match="deprecated"):
        _check_invocation(["match", "--index", "big.index"])
    with pytest.raises(AssertionError, match="no option --indexx"):
        _check_invocation(["match", "--indexx", "big.index"])
    with pytest.raises(AssertionError, match="not a choice"):
        _check_invocation(["match", "--engine", "spark"])
    _check_invocation(["index", "build", "--catalog", "c.jsonl", "--out", "c.index"])


# ------------------------------------------------------------------ the README is a front door


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES


_LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")


def test_readme_links_point_at_files_that_exist() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [m["target"] for m in _LINK.finditer(text) if "://" not in m["target"]]
    assert targets, "the README maps the features onto docs/"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert missing == []


def test_every_exported_name_has_a_reference_entry() -> None:
    reference = "\n".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "docs/reference").glob("*.md")
    )
    documented = set(re.findall(r"^::: nem_llm\.(\w+)\s*$", reference, flags=re.MULTILINE))
    missing = sorted(set(nem_llm.__all__) - documented - {"__version__"})
    assert missing == [], "add a '::: nem_llm.<name>' entry to docs/reference/"


def test_docs_pages_are_all_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    missing = [p for p in pages if p not in config]
    assert missing == []
