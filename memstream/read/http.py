"""The read API over HTTP (FastAPI; OpenAPI spec at ``/openapi.json``) and ``memstream serve``.

``POST /v1/read`` takes the query latent as a JSON list of numbers (``query``) or as base64
of little-endian float32 (``query_b64``), a ``session_id`` and ``k``; it answers what
:meth:`memstream.read.Memory.read` returns. A refused request gets a 4xx with a typed body,
``{"error": {"code": ..., "message": ...}}``: 422 ``invalid_query`` (wrong width, NaN or
Inf, bad k or route), 422 ``malformed_request`` (not JSON, missing or mistyped fields),
404 ``unknown_session``. The service binds 127.0.0.1 unless told otherwise.

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


def create_app(memory, workers: int = READ_WORKERS):
    """The FastAPI app serving ``memory`` (a :class:`memstream.read.Memory`) with ``workers``
    read threads; closing the app flushes the memory's accounting."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from pydantic import BaseModel, ConfigDict, Field

    from memstream.read.memory import MAX_K, EpisodicProvenance, LongTermProvenance

    dim = memory.dim
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
        code: str = Field(description="invalid_query, malformed_request, unknown_session, integrity or unavailable")
        message: str = Field(description="what was wrong and what to do")

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

    app = FastAPI(title="memstream read API", version="1", lifespan=lifespan,
                  description="One read over a session's episodic window and the long-term store, routed by a "
                              "learned policy, with provenance. Errors: {\"error\": {\"code\", \"message\"}}.")

    def error(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)

    @app.exception_handler(ReadError)
    async def _read_error(request: Request, e: ReadError):
        return error(e.status, e.code, str(e))

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
        return error(500, "integrity", f"stored data failed verification: {e}")

    @app.exception_handler(ServiceError)
    async def _unavailable(request: Request, e: ServiceError):
        return error(503, "unavailable", str(e))

    refusals = {400: {"model": ErrorBody, "description": "the body could not be parsed at all"},
                404: {"model": ErrorBody, "description": "unknown session"},
                422: {"model": ErrorBody, "description": "invalid query or malformed request"},
                500: {"model": ErrorBody, "description": "stored data failed verification"},
                503: {"model": ErrorBody, "description": "a store or Kafka is unavailable"}}

    def serve_read(req: ReadRequest) -> Response:
        """One read and its JSON, on a worker thread."""
        if (req.query is None) == (req.query_b64 is None):
            raise InvalidQueryError("pass the query latent as exactly one of 'query' (numbers) or 'query_b64'")
        query = req.query if req.query is not None else decode_b64(req.query_b64, dim)
        result = memory.read(query, req.session_id, req.k, route=req.route)
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
    async def read(req: ReadRequest) -> Response:
        return await anyio.to_thread.run_sync(functools.partial(serve_read, req), limiter=limiter)

    @app.get("/v1/stats", response_model=Stats)
    def stats() -> Stats:
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
