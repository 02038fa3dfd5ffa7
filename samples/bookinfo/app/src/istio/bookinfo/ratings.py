"""ratings: the stars each reviewer gave."""

from __future__ import annotations

from aiohttp import web

from istio.bookinfo.common import base_app

RATINGS = {"Reviewer1": 5, "Reviewer2": 4}


async def ratings(request: web.Request) -> web.Response:
    try:
        product_id = int(request.match_info["id"])
    except ValueError:
        return web.json_response({"error": "please provide numeric product ID"}, status=400)
    return web.json_response({"id": product_id, "ratings": RATINGS})


def make_app(version: str = "v1") -> web.Application:
    app = base_app("ratings", version)
    app.router.add_get("/ratings/{id}", ratings)
    return app
