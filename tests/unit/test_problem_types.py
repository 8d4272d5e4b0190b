"""The problem-type catalogue (app/problems.py, docs/problems.md) names every code the service emits,
with the statuses it comes with, and nothing else (CONVENTIONS 6: a stable, documented type per problem)."""

from __future__ import annotations

import ast
import pathlib

import app.estimators.base as estimator_base
from app.api import errors as api_errors
from app.problems import PROBLEM_TYPES, problem_types_markdown
from app.storage import formats

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "app").rglob("*.py"), *(ROOT / "worker").rglob("*.py")])
# calls that take (status, code, ...) positionally or code= by keyword
CODE_TAKERS = {"ProblemError": 1, "_problem": 1, "_unauthorized": 0, "invalid_field": None}


def _literal_codes() -> list[tuple[str, int | None, str]]:
    """(code, status or None, where) for every problem built with a literal code in app/ and worker/."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name not in CODE_TAKERS:
                continue
            kw = {k.arg: k.value for k in node.keywords}
            position = CODE_TAKERS[name]
            code = kw.get("code")
            if code is None and position is not None and len(node.args) > position:
                code = node.args[position]
            if code is None and name == "invalid_field":
                code = ast.Constant("invalid-request")
            status = kw.get("status")
            if status is None and name in ("ProblemError", "_problem") and node.args:
                status = node.args[0]
            if status is None and name == "invalid_field":
                status = ast.Constant(422)
            if status is None and name == "_unauthorized":
                status = ast.Constant(401)
            if isinstance(code, ast.Constant) and isinstance(code.value, str):
                s = status.value if isinstance(status, ast.Constant) else None
                found.append((code.value, s, f"{path.relative_to(ROOT)}:{node.lineno}"))
    return found


def test_every_literal_code_is_catalogued_with_its_status():
    found = _literal_codes()
    assert len({c for c, _, _ in found}) >= 40  # the scan sees the service's problems
    missing = [(c, where) for c, _, where in found if c not in PROBLEM_TYPES]
    assert not missing, f"add these codes to app/problems.PROBLEM_TYPES: {missing}"
    wrong = [(c, s, where) for c, s, where in found if s is not None and s not in PROBLEM_TYPES[c].statuses]
    assert not wrong, f"status not catalogued for: {wrong}"


def test_codes_chosen_at_run_time_are_catalogued():
    estimator_codes = {
        cls.code for cls in vars(estimator_base).values() if isinstance(cls, type) and hasattr(cls, "code")
    }
    assert {"estimator-error", "numerical-instability"} <= estimator_codes
    dynamic = estimator_codes | set(formats._TITLES) | set(api_errors._CODES.values())
    assert dynamic <= PROBLEM_TYPES.keys(), dynamic - PROBLEM_TYPES.keys()
    # the HTTP-level codes come with their own status
    for status, code in api_errors._CODES.items():
        assert status in PROBLEM_TYPES[code].statuses


def test_catalogue_has_no_stale_codes():
    """Each catalogued code appears as a string literal somewhere in app/ or worker/ besides the catalogue."""
    literals: set[str] = set()
    for path in SOURCES:
        if path.name == "problems.py" and path.parent.name == "app":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
    # invalid_field's default code lives in its signature in app/problems.py
    stale = sorted(set(PROBLEM_TYPES) - literals - {"invalid-request"})
    assert not stale, f"catalogued but never emitted: {stale}"


def test_catalogue_entries_are_well_formed():
    for code, pt in PROBLEM_TYPES.items():
        assert code == code.lower() and " " not in code and not code.startswith("http-")
        assert pt.statuses and all(400 <= s <= 599 for s in pt.statuses), code
        assert pt.description.endswith("."), code


def test_docs_page_is_rendered_from_the_catalogue():
    page = (ROOT / "docs" / "problems.md").read_text()
    assert page == problem_types_markdown(), "regenerate: python -m app.problems > docs/problems.md"
    assert all(f"| `{code}` |" in page for code in PROBLEM_TYPES)
