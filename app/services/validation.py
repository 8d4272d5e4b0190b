"""Turn estimator-library parameter dataclasses into validated objects or 422 problems."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

from app.estimators import EstimatorError
from app.problems import FieldError, ProblemError


@lru_cache(maxsize=128)
def adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def json_schema(cls: type) -> dict[str, Any]:
    return adapter(cls).json_schema()


def pointer(prefix: str, loc: tuple[Any, ...]) -> str:
    return prefix + "".join(f"/{part}" for part in loc)


def validate_params(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Validate ``data`` against dataclass ``cls``; unknown keys are errors too."""
    if not isinstance(data, dict):
        raise ProblemError(
            422,
            "invalid-request",
            "The request is invalid",
            "expected an object",
            [FieldError(prefix, "expected an object")],
        )
    known = set(cls.__dataclass_fields__)
    errors = [FieldError(f"{prefix}/{key}", "unknown parameter") for key in data if key not in known]
    try:
        value = adapter(cls).validate_python(data, strict=False) if not errors else None
    except ValidationError as exc:
        errors += [FieldError(pointer(prefix, err["loc"]), err["msg"]) for err in exc.errors()]
    if errors:
        raise ProblemError(
            422,
            "invalid-parameters",
            "Invalid parameters",
            "; ".join(f"{e.pointer}: {e.detail}" for e in errors),
            errors,
        )
    return value


def estimator_problem(exc: EstimatorError, prefix: str = "") -> ProblemError:
    errors = [FieldError(prefix + exc.parameter, exc.detail)] if exc.parameter else []
    return ProblemError(422, exc.code, "The request cannot be computed", exc.detail, errors)
