"""The package layout: imports run downward only (see the README's Layout section).

cli -> integrations -> jobs -> matcher -> matching -> retrieval, llm -> base modules. ``sim``
and
``testing`` sit beside the base (the simulator needs only ``errors``); nothing below
``jobs`` may import ``jobs``, nothing below ``matcher`` the matcher, and ``retrieval`` and
``llm`` do not import each other. ``records`` (the field-by-field model) is pure and sits
on the base: retrieval, the matcher, jobs, integrations and the CLI may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nem_llm"

BASE = {
    "models", "config", "errors", "_text", "catalog", "settings",
    "_sqlite", "_sync", "_gc", "_parquet", "_sniff",
}  # fmt: skip
# layer of a module -> the layers it may import
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "records": {"base", "records"},
    "sim": {"base", "sim"},
    "retrieval": {"base", "records", "retrieval"},
    "llm": {"base", "llm"},
    "matching": {"base", "records", "retrieval", "llm", "matching"},
    "matcher": {"base", "records", "retrieval", "llm", "matching", "matcher"},
    "testing": {"base", "sim", "testing"},
    "jobs": {
        "base",
        "sim",
        "testing",
        "records",
        "retrieval",
        "llm",
        "matching",
        "matcher",
        "jobs",
    },
    "integrations": {
        "base",
        "sim",
        "testing",
        "records",
        "retrieval",
        "llm",
        "matching",
        "matcher",
        "jobs",
        "integrations",
    },
    "cli": {
        "base",
        "sim",
        "testing",
        "records",
        "retrieval",
        "llm",
        "matching",
        "matcher",
        "jobs",
        "integrations",
        "cli",
    },
    "init": {"base", "matcher"},
}


# public modules over an internal package of another name: their layer
PUBLIC_FACES = {"local": "llm"}

# (module, target) pairs allowed against the flow, each for a stated reason (none today)
EXCEPTIONS: set[tuple[str, str]] = set()


def _layer(parts: list[str]) -> str:
    """The layer of a module given its path parts under nem_llm (``["llm", "governor"]``)."""
    # an internal package is named with a leading underscore (nem_llm._retrieval); its public
    # face, a module of the same name (nem_llm/retrieval.py), sits in the same layer
    head = parts[0]
    if head.startswith("_") and head not in BASE and head != "__init__":
        head = head[1:]
    head = PUBLIC_FACES.get(head, head)
    if head == "__init__" and len(parts) == 1:
        return "init"
    if head in {"records", "retrieval", "llm", "matching", "jobs", "integrations", "sim"}:
        return head
    if head in BASE:
        return "base"
    if head in {"matcher", "testing", "cli"}:
        return head
    if head == "prompts":
        return "base"
    raise AssertionError(
        f"nem_llm/{'/'.join(parts)}.py has no layer: add it to tests/test_layout.py"
    )


def _imports(path: Path) -> list[tuple[int, list[str]]]:
    """(line, target parts under nem_llm) of every nem_llm import in a module."""
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    package = list(rel[:-1])  # the package a relative import starts from
    out: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:  # from . import x
                    for alias in node.names:
                        out.append((node.lineno, [*target, alias.name]))
                    continue
                out.append((node.lineno, target))
            elif node.module and node.module.split(".")[0] == "nem_llm":
                out.append((node.lineno, node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nem_llm":
                    out.append((node.lineno, alias.name.split(".")[1:]))
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downward_only(path: Path) -> None:
    here = _layer(list(path.relative_to(PACKAGE).with_suffix("").parts))
    for line, target in _imports(path):
        if not target:
            continue  # "from . import" of the package itself
        there = _layer(target)
        if (".".join(path.relative_to(PACKAGE).with_suffix("").parts), ".".join(target)) in (
            EXCEPTIONS
        ):
            continue
        assert there in ALLOWED[here], (
            f"nem_llm/{path.relative_to(PACKAGE)}:{line} ({here}) imports "
            f"nem_llm.{'.'.join(target)} ({there}): imports must run downward"
        )


def test_every_module_is_checked() -> None:
    assert len(MODULES) > 30


def test_every_package_ships_in_the_wheel() -> None:
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(("nem_llm", *init.parent.relative_to(PACKAGE).parts))
        for init in PACKAGE.rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_reach_into_another_packages_private_names(path: Path) -> None:
    """An underscore name is private to its package: a module imports one only from its
    own package (``from ._lines import _x`` inside ``_jobs/io``), never from another."""
    rel = list(path.relative_to(PACKAGE).with_suffix("").parts)
    here = rel[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            target = here[: len(here) - (node.level - 1)] + (node.module or "").split(".")
        elif node.module and node.module.split(".")[0] == "nem_llm":
            target = node.module.split(".")[1:]
        else:
            continue
        target = [t for t in target if t]
        private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
        if private:
            assert target[:-1] == here or target == here, (
                f"nem_llm/{path.relative_to(PACKAGE)}:{node.lineno} imports {private} "
                f"from nem_llm.{'.'.join(target)}: a private name of another package"
            )


@pytest.mark.parametrize("face", ["jobs", "retrieval", "local", "records", "testing", "sim"])
def test_public_faces_export_what_they_list(face: str) -> None:
    """Each public module's ``__all__`` names what it holds, and nothing it lists is private."""
    import importlib

    module = importlib.import_module(f"nem_llm.{face}")
    names = list(module.__all__)
    assert names and all(hasattr(module, n) for n in names), face
    assert not [n for n in names if n.startswith("_")], face


def test_no_module_is_over_800_lines_and_the_matcher_is_a_facade() -> None:
    """Issue 21: long units hide structure. A module past 800 lines is split by concern;
    matcher.py stays a facade over the stages (at most 600)."""
    sizes = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES}
    assert [str(p.relative_to(PACKAGE)) for p, n in sizes.items() if n > 800] == []
    assert sizes[PACKAGE / "matcher.py"] <= 600
