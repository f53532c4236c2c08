"""The read API over HTTP (FastAPI; OpenAPI spec at ``/openapi.json``) and ``memstream serve``.

``POST /v1/read`` takes the query latent as a JSON list of numbers (``query``) or as base64
of little-endian float32 (``query_b64``), a ``session_id`` and ``k``; it answers what
:meth:`memstream.read.Memory.read` returns. A refused request gets a 4xx with a typed body,
``{"error": {"code": ..., "message": ...}}``: 422 ``invalid_query`` (wrong width, NaN or
Inf, bad k or route), 422 ``malformed_request`` (not JSON, missing or mistyped fields),
404 ``unknown_session``, 401 ``unauthenticated``, 403 ``forbidden``; errors memstream raises
also name their class in ``type`` (e.g. ``AuthorizationError``). The service binds 127.0.0.1
unless told otherwise.

Access: every read needs ``Authorization: Bearer <credential>`` of a tenant that owns the
session and a credential granted it (:mod:`memstream.access`); the check runs before the read,
so a refused read touches neither the read ledger nor decay. Long-term search is limited to
the tenant's subjects. ``insecure_no_auth=True`` serves everyone everything, and says so.

Concurrency: the endpoint is asynchronous; each read (and the JSON of its answer) runs on a
pool of ``workers`` threads, so the event loop keeps accepting requests, at most ``workers``
reads compete for the cores, and no lock is held across a read (``Memory`` is thread-safe).
"""

import base64
import binascii
import contextlib
import functools
import logging
from typing import Annotated, Literal

import numpy as np

from memstream.errors import ConfigError, IntegrityError, InvalidQueryError, ReadError, ServiceError
from memstream.settings import READ_WORKERS

log = logging.getLogger(__name__)

FLOAT32_MAX = float(np.finfo(np.float32).max)


def create_app(memory, workers: int = READ_WORKERS, *, access=None, insecure_no_auth: bool = False):
    """The FastAPI app serving ``memory`` (a :class:`memstream.read.Memory`) with ``workers``
    read threads; closing the app flushes the memory's accounting and stops ``access``.

    ``access``: an :class:`memstream.access.AccessGuard` that checks every read. Without
    one the app refuses to be built unless ``insecure_no_auth=True``: open by choice only."""
    import anyio
    from fastapi import Depends, FastAPI, Request
    from fastapi.security import HTTPBearer
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from pydantic import BaseModel, ConfigDict, Field

    from memstream.read.memory import MAX_K, EpisodicProvenance, LongTermProvenance

    dim = memory.dim
    if access is None and not insecure_no_auth:
        raise ConfigError("the read API needs an access guard (tenants and credentials: `memstream tenants add`); "
                          "to serve without authentication pass insecure_no_auth=True (--insecure-no-auth)")
    if access is not None and insecure_no_auth:
        raise ConfigError("pass an access guard or insecure_no_auth=True, not both")
    if workers < 1:
        raise ConfigError(f"the read service needs at least one worker thread, got {workers}")
    limiter = anyio.CapacityLimiter(workers)

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    n_bytes = 4 * dim
    pad = (3 - n_bytes % 3) % 3
    b64_pattern = f"^[A-Za-z0-9+/]{{{4 * -(-n_bytes // 3) - pad}}}={{{pad}}}$"
    finite32 = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]

    class ReadRequest(Strict):
        # Exactly one of the two query fields, neither of them null.
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "oneOf": [{"required": ["query"]}, {"required": ["query_b64"]}]})

        query: list[finite32] = Field(None, min_length=dim, max_length=dim,
                                      description=f"the query latent: {dim} finite numbers")
        query_b64: str = Field(None, pattern=b64_pattern,
                               description=f"...or base64 of {dim} little-endian float32 values")
        session_id: str = Field(min_length=1, max_length=512, description="session whose episodic window is read")
        k: int = Field(8, ge=1, le=MAX_K, description="fragments per store consulted")
        route: Literal["episodic", "longterm", "both"] | None = Field(
            None, description="override the routing policy (omit to let it decide)")

    class FragmentOut(Strict):
        source: Literal["episodic", "longterm"]
        tier: Literal["hot", "cold"]
        score: float
        bias: float
        episodic: EpisodicProvenance | None  # the read module's dataclasses: one definition
        longterm: LongTermProvenance | None
        latent: list[float] | None = Field(description="episodic: the decoder's reconstruction from this summary")
        payload_b64: str | None = Field(description="long-term: the entry's payload, base64")
        payload_kind: str | None

    class RouteOut(Strict):
        route: Literal["episodic", "longterm", "both"]
        probabilities: dict[str, float]
        chosen_by: Literal["policy", "caller"]

    class ReadResponse(Strict):
        read_id: str
        session_id: str
        route: RouteOut
        fragments: list[FragmentOut]
        reconstruction: list[float] | None
        sampled: bool
        divergent: bool | None
        timings_ms: dict[str, float]

    class ErrorDetail(Strict):
        code: str = Field(description="invalid_query, malformed_request, unknown_session, unauthenticated, "
                                      "forbidden, integrity or unavailable")
        message: str = Field(description="what was wrong and what to do")
        type: str | None = Field(None, description="the memstream error class, e.g. AuthorizationError")

    class ErrorBody(Strict):
        error: ErrorDetail

    class Stats(Strict):
        reads: int
        by_route: dict[str, int]
        sampled: int
        divergent: int
        published: int

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        memory.close()
        if access is not None:
            access.close()

    app = FastAPI(title="memstream read API", version="1", lifespan=lifespan,
                  description="One read over a session's episodic window and the long-term store, routed by a "
                              "learned policy, with provenance. Errors: {\"error\": {\"code\", \"message\"}}.")

    def error(status: int, code: str, message: str, e: Exception | None = None) -> JSONResponse:
        body = {"code": code, "message": message}
        if e is not None:
            body["type"] = type(e).__name__
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None  # RFC 6750
        return JSONResponse({"error": body}, status_code=status, headers=headers)

    @app.exception_handler(ReadError)
    async def _read_error(request: Request, e: ReadError):
        return error(e.status, e.code, str(e), e)

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg')}")
        return error(422, "malformed_request", "; ".join(parts) or "the request body is not valid JSON")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):  # e.g. a body that is not UTF-8 JSON
        code = "malformed_request" if e.status_code == 400 else "not_found" if e.status_code == 404 else "http_error"
        return error(e.status_code, code, str(e.detail))

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, e: IntegrityError):
        return error(500, "integrity", f"stored data failed verification: {e}", e)

    @app.exception_handler(ServiceError)
    async def _unavailable(request: Request, e: ServiceError):
        return error(503, "unavailable", str(e), e)

    refusals = {400: {"model": ErrorBody, "description": "the body could not be parsed at all"},
                401: {"model": ErrorBody, "description": "no credential, or one unknown, expired or revoked"},
                403: {"model": ErrorBody, "description": "the credential is not granted this session"},
                404: {"model": ErrorBody, "description": "unknown session"},
                422: {"model": ErrorBody, "description": "invalid query or malformed request"},
                500: {"model": ErrorBody, "description": "stored data failed verification"},
                503: {"model": ErrorBody, "description": "a store or Kafka is unavailable"}}

    if access is not None:
        # Declares the bearer scheme in the OpenAPI spec; the check itself is AccessGuard's, so
        # that a missing header is a typed 401 rather than FastAPI's own 403.
        bearer = HTTPBearer(auto_error=False, description="a credential of `memstream credentials issue`")

        def authorization(request: Request, _=Depends(bearer)) -> str | None:
            return request.headers.get("authorization")
    else:  # open: the spec must not promise a check that is not made
        def authorization() -> None:
            return None

    def serve_read(req: ReadRequest, subjects: frozenset[str] | None) -> Response:
        """One read and its JSON, on a worker thread."""
        if (req.query is None) == (req.query_b64 is None):
            raise InvalidQueryError("pass the query latent as exactly one of 'query' (numbers) or 'query_b64'")
        query = req.query if req.query is not None else decode_b64(req.query_b64, dim)
        result = memory.read(query, req.session_id, req.k, route=req.route, subjects=subjects)
        fragments = []
        for f in result.fragments:
            p = f.provenance
            ep = isinstance(p, EpisodicProvenance)
            fragments.append(FragmentOut(
                source=f.source, tier=f.tier, score=f.score, bias=f.bias,
                episodic=p if ep else None, longterm=None if ep else p,
                latent=None if f.latent is None else f.latent.tolist(),
                payload_b64=None if f.payload is None else base64.b64encode(f.payload).decode(),
                payload_kind=f.payload_kind))
        body = ReadResponse(read_id=result.read_id, session_id=result.session_id,
                            route=RouteOut(**result.route.__dict__), fragments=fragments,
                            reconstruction=None if result.reconstruction is None else result.reconstruction.tolist(),
                            sampled=result.sampled, divergent=result.divergent, timings_ms=result.timings_ms)
        return Response(body.model_dump_json(), media_type="application/json")

    @app.post("/v1/read", response_model=ReadResponse, responses=refusals)
    async def read(req: ReadRequest, auth: str | None = Depends(authorization)) -> Response:
        subjects = None
        if access is not None:  # before the read: a refused read is neither run nor accounted
            subjects = access.check(auth, req.session_id).subjects
        return await anyio.to_thread.run_sync(functools.partial(serve_read, req, subjects), limiter=limiter)

    @app.get("/v1/stats", response_model=Stats, responses={401: refusals[401]})
    def stats(auth: str | None = Depends(authorization)) -> Stats:
        if access is not None:  # counts of every tenant's reads: for holders of a credential only
            access.authenticate(auth)
        s = memory.stats
        return Stats(reads=s.reads, by_route=dict(s.by_route), sampled=s.sampled, divergent=s.divergent,
                     published=s.published)

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def decode_b64(text: str, dim: int) -> np.ndarray:
    """``dim`` little-endian float32 values from base64 (the request schema checked its length)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidQueryError("query_b64 is not valid base64") from None
    if len(raw) != 4 * dim:
        raise InvalidQueryError(f"query_b64 holds {len(raw)} bytes; {dim} float32 values are {4 * dim} bytes")
    return np.frombuffer(raw, "<f4")
