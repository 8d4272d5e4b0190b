"""Request-scoped dependencies: settings, DB session, artifact store, paging, conditional GETs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response, UploadFile
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session

from app.db.session import get_sessionmaker
from app.problems import ProblemError
from app.services.models import WeightsUpload
from app.services.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from app.settings import Settings
from app.storage.artifacts import ArtifactStore


# Async so FastAPI calls them inline instead of hopping to the threadpool for an attribute read.
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_session(request: Request) -> Iterator[Session]:
    """One session per request: commit on success, roll back on error.

    A value the database cannot hold (a NUL character in an id or a name, an integer too big for
    its column) is the client's error, so it answers 422 rather than 500.
    """
    session = get_sessionmaker(request.app.state.settings)()
    try:
        yield session
        session.commit()
    except DataError as exc:
        session.rollback()
        raise ProblemError(
            422,
            "unstorable-value",
            "The request is invalid",
            f"a value in the request cannot be stored: {type(exc.orig).__name__}",
        ) from None
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
# "function": commit before the response is sent, so a client that got 2xx reads its own write and a
# failed commit answers an error instead of a success already on the wire.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Items per page.")]
PageToken = Annotated[str | None, Query(description="next_page_token from the previous page.")]
DEFAULT_PAGE = DEFAULT_PAGE_SIZE


def etag_of(payload: Any) -> str:
    body = json.dumps(jsonable_encoder(payload), sort_keys=True, separators=(",", ":"))
    return 'W/"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'


def conditional(request: Request, response: Response, model: BaseModel) -> BaseModel | Response:
    """Set ETag; answer 304 when the client already has this representation."""
    tag = etag_of(model)
    if request.headers.get("if-none-match") == tag:
        return Response(status_code=304, headers={"ETag": tag, **_passthrough(response)})
    response.headers["ETag"] = tag
    return model


def _passthrough(response: Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower() in ("retry-after",)}


def require_match(request: Request, model: BaseModel) -> None:
    """Optimistic concurrency for PATCH: If-Match must name the current ETag when sent."""
    expected = request.headers.get("if-match")
    if expected is not None and expected != etag_of(model):
        raise ProblemError(
            412,
            "precondition-failed",
            "Precondition failed",
            "the resource changed since you read it; GET it again",
        )


def stage_upload(stack: ExitStack, store: ArtifactStore, upload: UploadFile, pointer: str) -> WeightsUpload:
    """Copy an upload into the store's staging area while hashing; removed on exit unless committed."""
    path = stack.enter_context(store.staging_file())
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        while block := upload.file.read(1024 * 1024):
            digest.update(block)
            out.write(block)
    upload.file.seek(0)
    return WeightsUpload(path=path, sha256=digest.hexdigest(), pointer=pointer)
