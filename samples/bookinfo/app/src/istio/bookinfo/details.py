"""details: the book's bibliographic details."""

from __future__ import annotations

from aiohttp import web

from istio.bookinfo.common import base_app


def book_details(product_id: int) -> dict[str, object]:
    return {
        "id": product_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


async def details(request: web.Request) -> web.Response:
    try:
        product_id = int(request.match_info["id"])
    except ValueError:
        return web.json_response({"error": "please provide numeric product id"}, status=400)
    return web.json_response(book_details(product_id))


def make_app(version: str = "v1") -> web.Application:
    app = base_app("details", version)
    app.router.add_get("/details/{id}", details)
    return app
