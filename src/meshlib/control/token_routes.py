"""``/v1/tokens``: join tokens created, listed and revoked by the admin (``meshctl token``)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .requests import SMALL_BODY_BYTES, TooLarge, error, read_body, too_large
from .tokens import StoreUnavailable, TokenError, parse_token_request

if TYPE_CHECKING:
    from .app import ControlPlane


def token_routes(cp: ControlPlane) -> list[Route]:
    def store_or_refusal(request: Request) -> Response | None:
        denied = cp.check_admin(request)
        if denied is not None:
            return denied
        if cp.tokens is None:
            return error(503, "this control plane keeps no join tokens")
        return None

    async def create(request: Request) -> Response:
        refused = store_or_refusal(request)
        if refused is not None:
            return refused
        assert cp.tokens is not None
        try:
            asked = parse_token_request(json.loads(await read_body(request, SMALL_BODY_BYTES) or b"null"))
            token, record = await asyncio.to_thread(
                cp.tokens.create, asked.services, asked.namespace, asked.ttl, asked.description, asked.role
            )
        except TooLarge:
            return too_large(SMALL_BODY_BYTES)
        except StoreUnavailable as exc:
            return error(503, f"cannot create a token: {exc}")
        except (TokenError, ValueError, RecursionError) as exc:
            return error(400, f"cannot create a token: {exc}")
        return JSONResponse({"token": token, **record.public(record.created_at)}, status_code=201)

    async def listing(request: Request) -> Response:
        refused = store_or_refusal(request)
        if refused is not None:
            return refused
        assert cp.tokens is not None
        now = cp.stats.clock()
        return JSONResponse({"tokens": [r.public(now) for r in cp.tokens.records()]})

    async def revoke(request: Request) -> Response:
        refused = store_or_refusal(request)
        if refused is not None:
            return refused
        assert cp.tokens is not None
        token_id = request.path_params["id"]
        try:
            record = await asyncio.to_thread(cp.tokens.revoke, token_id)
        except StoreUnavailable as exc:
            return error(503, f"cannot revoke {token_id[:40]!r}: {exc}")
        if record is None:
            return error(404, f"no join token {token_id[:40]!r}: meshctl token list shows them")
        return JSONResponse(record.public(cp.stats.clock()))

    return [
        Route("/v1/tokens", create, methods=["POST"]),
        Route("/v1/tokens", listing, methods=["GET"]),
        Route("/v1/tokens/{id}", revoke, methods=["DELETE"]),
    ]
