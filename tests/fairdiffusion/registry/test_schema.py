"""Every ``fd.*`` MLflow key is spelled once, in the registry schema, so a rename cannot drift."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fairdiffusion.registry import schema

PACKAGE = Path(schema.__file__).resolve().parents[1]
#: An ``fd.`` key inside any string: a tag name, a prefix, or one in a search query.
FD_KEY = re.compile(r"(?<![\w.])fd\.\w")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (prose may name ``fd.data.*`` tags)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _fd_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal, docstrings aside, that spells an ``fd.`` key."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = _docstrings(tree)
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and FD_KEY.search(node.value)
    ]


def test_no_fd_key_is_spelled_outside_the_schema() -> None:
    sources = [p for p in sorted(PACKAGE.rglob("*.py")) if p.resolve() != Path(schema.__file__).resolve()]
    assert len(sources) > 10, "the scan must see the whole library"
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line}: {text!r}" for path in sources for line, text in _fd_literals(path)
    ]
    assert offenders == [], "use the constants of fairdiffusion.registry.schema:\n" + "\n".join(offenders)


def test_the_scan_finds_keys_but_not_prose(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text(
        '"""A docstring may name the fd.data.* tags."""\n'
        'TAG = "fd.gate.passed"\n'
        "QUERY = f\"tags.`fd.audit.model` = '{1}'\"\n"
        'PROSE = "fairdiffusion, pdf.x"\n'
    )
    assert _fd_literals(module) == [(2, "fd.gate.passed"), (3, "tags.`fd.audit.model` = '")]


def test_every_fd_key_is_distinct() -> None:
    keys = {name: value for name, value in vars(schema).items() if name.isupper() and str(value).startswith("fd.")}
    assert len(keys) > 40
    assert len(set(keys.values())) == len(keys), "two constants name the same MLflow key"
    prefixes = (schema.DATA_TAG_PREFIX, schema.CODE_TAG_PREFIX)
    assert all(key.startswith(prefixes) for name, key in keys.items() if name.startswith(("DATA_", "CODE_")))


def test_aliases_are_distinct() -> None:
    assert len({schema.CHAMPION, schema.CANDIDATE, schema.PREVIOUS_CHAMPION}) == 3
