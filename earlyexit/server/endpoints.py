"""What both HTTP front ends share (the embedded server and the Ray Serve replicas).

Reading a body under a size limit, the ``{"error": ...}`` answer, the token check of the endpoints
that change state, the ``/save`` body, and the ``/predict`` answer. Both front ends answer the
same requests the same way because they call these.

Example:
    >>> json_error(415, "expected image/png").status_code  # doctest: +SKIP
    415
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Any

from .._optional import import_extra_package
from .backends import ServedBatch
from .decoding import RequestError, media_type

responses = import_extra_package("fastapi.responses", "earlyexit serve", "serve")

__all__ = [
    "authorize",
    "json_error",
    "predict_answer",
    "predict_payload",
    "read_body",
    "save_path_of",
]

#: Largest ``/save`` body read (it only names a path).
SAVE_BODY_LIMIT = 64 * 1024


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    """A ``{"error": message}`` JSON answer with ``status``."""
    return responses.JSONResponse({"error": message}, status_code=status, headers=headers)


def predict_payload(served: ServedBatch, num_exits: int, **extra: Any) -> dict[str, Any]:
    """The ``/predict`` answer's JSON: ``{"predictions", "heads_version", "num_exits", **extra}``."""
    return {
        "predictions": served.predictions,
        "heads_version": served.heads_version,
        "num_exits": num_exits,
        **extra,
    }


def predict_answer(served: ServedBatch, num_exits: int, **extra: Any) -> Any:
    """The ``/predict`` answer (:func:`predict_payload` as a JSON response)."""
    return responses.JSONResponse(predict_payload(served, num_exits, **extra))


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it exceeds ``limit`` bytes."""
    too_large = RequestError(413, f"the request body exceeds {limit} bytes (the server's limit)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def authorize(request: Any, token: str | None) -> Any:
    """``None`` when the request may change state (no token set, or the right one sent), else the
    401/403 answer."""
    if token is None:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return json_error(
            401,
            "this endpoint changes the server's state: send Authorization: Bearer TOKEN "
            "(the token the server was started with)",
            {"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return json_error(403, "wrong token")
    return None


async def save_path_of(request: Any, default: str | None) -> str:
    """The path a ``/save`` request asks for (``{"path": ...}``), or ``default``.

    Raises:
        RequestError: a body that is not ``{"path": "....safetensors"}``, or no path at all.
    """
    body = await read_body(request, SAVE_BODY_LIMIT)
    path: Any = default
    if body.strip():
        if media_type(request.headers.get("content-type")) not in ("application/json", ""):
            raise RequestError(415, 'expected a JSON body {"path": "heads.safetensors"} or none')
        try:
            payload = json.loads(body)
        except ValueError:
            raise RequestError(
                400, 'the body is not JSON; expected {"path": "heads.safetensors"} or none'
            ) from None
        if not isinstance(payload, dict) or set(payload) - {"path"}:
            raise RequestError(400, 'expected {"path": "heads.safetensors"} or no body')
        path = payload.get("path", default)
    if path is None:
        raise RequestError(
            400,
            "no path to save to: start the server with --save-on-exit PATH or send "
            '{"path": "heads.safetensors"}',
        )
    if not isinstance(path, str) or not path.endswith(".safetensors"):
        raise RequestError(400, f"expected a path ending in .safetensors, got {path!r}")
    return str(Path(path))
