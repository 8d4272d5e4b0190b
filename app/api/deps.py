"""Request-scoped dependencies: settings, DB session, artifact store, paging, conditional GETs."""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Query, Request, Response, UploadFile
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db.session import autocommit_session, get_sessionmaker
from app.problems import ProblemError
from app.services.models import WeightsUpload
from app.services.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from app.settings import Settings
from app.storage.artifacts import ArtifactStore

SESSION_EXIT_THREADS = 8
T = TypeVar("T")


# Async so FastAPI calls them inline instead of hopping to the threadpool for an attribute read.
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def _unstorable(exc: DataError) -> ProblemError:
    return ProblemError(
        422,
        "unstorable-value",
        "The request is invalid",
        f"a value in the request cannot be stored: {type(exc.orig).__name__}",
    )


def _commit_and_close(session: Session) -> None:
    try:
        session.commit()
    except DataError as exc:
        session.rollback()
        raise _unstorable(exc) from None
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _run_in_session(settings: Settings, fn: Callable[..., T], args: tuple, autocommit: bool) -> T:
    if autocommit:
        with autocommit_session(settings) as session:
            try:
                return fn(session, *args)
            except DataError as exc:
                raise _unstorable(exc) from None
    session = get_sessionmaker(settings)()
    try:
        result = fn(session, *args)
    except DataError as exc:
        _rollback_and_close(session)
        raise _unstorable(exc) from None
    except BaseException:
        _rollback_and_close(session)
        raise
    _commit_and_close(session)
    return result


async def in_session(request: Request, fn: Callable[..., T], *args: Any, autocommit: bool = False) -> T:
    """``fn(session, *args)`` with its own session, committed and closed, in one threadpool hop.

    For the hottest routes (status poll, submission), which are ``async def`` and return their
    JSON themselves: a :data:`SessionDep` route costs three hops (endpoint, session exit,
    response validation). The connection is returned inside the hop, so a waiting request can
    never hold a thread that a connection's holder needs. ``autocommit``: no transaction at all, each
    statement commits by itself (for a single read, or a single write such as the submission's insert).
    """
    return await run_in_threadpool(_run_in_session, request.app.state.settings, fn, args, autocommit)


def _rollback_and_close(session: Session) -> None:
    try:
        session.rollback()
    finally:
        session.close()


def _exit_limiter(request: Request) -> anyio.CapacityLimiter:
    limiter = getattr(request.app.state, "session_exit_limiter", None)
    if limiter is None:
        limiter = request.app.state.session_exit_limiter = anyio.CapacityLimiter(SESSION_EXIT_THREADS)
    return limiter


class CommittingRoute(APIRoute):
    """Sync endpoints commit their request's session in their own thread, before returning.

    That gives the database connection back while the endpoint still holds its threadpool slot.
    Without it, a finished endpoint keeps its connection until FastAPI has serialised the response
    (another threadpool call) and run the session's exit; under load every slot can be taken by
    endpoints waiting for a connection that only such a finished request can return: a deadlock
    until the pool times out.
    """

    def __init__(self, path: str, endpoint, **kwargs) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _committing(endpoint)
        super().__init__(path, endpoint, **kwargs)


def _committing(endpoint):
    @functools.wraps(endpoint)  # FastAPI reads the signature through __wrapped__
    def run(*args, **kwargs):
        result = endpoint(*args, **kwargs)
        for value in kwargs.values():
            if isinstance(value, Session):
                try:
                    value.commit()
                except DataError as exc:
                    value.rollback()
                    raise _unstorable(exc) from None
        return result

    return run


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request: commit on success, roll back on error.

    Endpoints routed through :class:`CommittingRoute` have committed already; the final commit
    runs on its own small thread limiter, not the endpoints' threadpool. Otherwise,
    under load, every pool thread can sit in an endpoint waiting for a database connection while
    the requests that hold the connections wait for a thread to commit and return them: a
    deadlock until the pool times out. A value the database cannot hold (a NUL character, an
    integer too big for its column) is the client's error, so it answers 422 rather than 500.
    """
    session = get_sessionmaker(request.app.state.settings)()  # no I/O until the first query
    try:
        yield session
    except DataError as exc:
        await anyio.to_thread.run_sync(_rollback_and_close, session, limiter=_exit_limiter(request))
        raise _unstorable(exc) from None
    except BaseException:
        await anyio.to_thread.run_sync(_rollback_and_close, session, limiter=_exit_limiter(request))
        raise
    await anyio.to_thread.run_sync(_commit_and_close, session, limiter=_exit_limiter(request))


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
# "function": commit before the response is sent, so a client that got 2xx reads its own write and a
# failed commit answers an error instead of a success already on the wire.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Items per page.")]
PageToken = Annotated[str | None, Query(description="next_page_token from the previous page.")]
DEFAULT_PAGE = DEFAULT_PAGE_SIZE


def etag_of(model: BaseModel) -> str:
    return _etag(model.model_dump_json().encode())


def _etag(body: bytes) -> str:
    return 'W/"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def etag_listed(header: str | None, tag: str) -> bool:
    """Whether an If-None-Match / If-Match value names ``tag``: ``*``, or a comma-separated list of
    entity tags compared weakly (RFC 9110 8.8.3.2: ``W/"x"`` and ``"x"`` are the same tag). Our tags are
    weak, so If-Match, which RFC 9110 compares strongly, accepts them weakly too: they are what a
    client has to send."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    opaque = tag.removeprefix("W/")
    return any(candidate.strip().removeprefix("W/") == opaque for candidate in header.split(","))


def conditional(request: Request, response: Response, model: BaseModel) -> BaseModel | Response:
    """Set ETag; answer 304 when the client already has this representation."""
    tag = etag_of(model)
    if etag_listed(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers={"ETag": tag})
    response.headers["ETag"] = tag
    return model


def json_response(
    model: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """The model serialised once, by pydantic-core (a route's ``response_model`` still documents it)."""
    return Response(model.model_dump_json(), status_code, headers, media_type="application/json")


def conditional_json(
    request: Request, model: BaseModel, headers: dict[str, str], volatile: frozenset[str] = frozenset()
) -> Response:
    """:func:`conditional` for routes that return their JSON themselves (serialised once).

    ``volatile`` fields are left out of the (weak) tag: a value that moves on every request, such as a
    running job's duration, would otherwise never let a poll be answered 304."""
    body = model.model_dump_json().encode()
    tag = _etag(model.model_dump_json(exclude=set(volatile)).encode() if volatile else body)
    if etag_listed(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers={"ETag": tag, **headers})
    return Response(body, media_type="application/json", headers={"ETag": tag, **headers})


def require_match(request: Request, model: BaseModel) -> bool:
    """Optimistic concurrency for PATCH: If-Match must name the current ETag when sent. True when it
    was sent: the update must then also be fenced on the version read (a concurrent PATCH that
    matched the same ETag and committed first makes it 412 too)."""
    expected = request.headers.get("if-match")
    if expected is not None and not etag_listed(expected, etag_of(model)):
        raise precondition_failed()
    return expected is not None


def precondition_failed() -> ProblemError:
    return ProblemError(
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
