"""productpage: the page a user sees, built from details and reviews, and the JSON API."""

from __future__ import annotations

import html
from importlib import resources

from aiohttp import web

from istio.bookinfo.common import base_app, get_json, service_url

PRODUCTS: list[dict[str, object]] = [
    {
        "id": 0,
        "title": "The Comedy of Errors",
        "descriptionHtml": (
            '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: '
            "The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his "
            "shortest and one of his most farcical comedies, with a major part of the humour "
            "coming from slapstick and mistaken identity, in addition to puns and word play."
        ),
    }
]
DETAILS_TIMEOUT = 3.0  # seconds
REVIEWS_TIMEOUT = 3.0  # seconds, tried twice: 6 s in all, less than a 7 s delay on ratings
RATINGS_TIMEOUT = 3.0
DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Sorry, product ratings are currently unavailable for this book."
STYLESHEET = resources.files("istio.bookinfo").joinpath("static", "bookinfo.css")

Product = tuple[int, object, str | None]  # status, JSON body, the answering workload


def _product_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": "please provide numeric product id"}', content_type="application/json"
        ) from None


class ProductPage:
    def __init__(self, details_url: str, reviews_url: str, ratings_url: str) -> None:
        self.details_url = details_url
        self.reviews_url = reviews_url
        self.ratings_url = ratings_url

    async def details(self, request: web.Request, product_id: int) -> Product:
        status, body, version = await get_json(
            request, f"{self.details_url}/details/{product_id}", time_limit=DETAILS_TIMEOUT
        )
        if status != 200:
            return status or 500, {"error": DETAILS_UNAVAILABLE}, version
        return status, body, version

    async def reviews(self, request: web.Request, product_id: int) -> Product:
        # As the original: 3 s, and one more try on any failure.
        status, body, version = 0, None, None
        for _ in range(2):
            status, body, version = await get_json(
                request, f"{self.reviews_url}/reviews/{product_id}", time_limit=REVIEWS_TIMEOUT
            )
            if status == 200:
                return status, body, version
        return status or 500, {"error": REVIEWS_UNAVAILABLE}, version

    async def ratings(self, request: web.Request, product_id: int) -> Product:
        status, body, version = await get_json(
            request, f"{self.ratings_url}/ratings/{product_id}", time_limit=RATINGS_TIMEOUT
        )
        if status != 200:
            return status or 500, {"error": RATINGS_UNAVAILABLE}, version
        return status, body, version

    # The pages.

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(
            text=_document(
                "Simple Bookstore App",
                "<main><h2>Hello! This is a simple bookstore application consisting of three "
                "services as shown below</h2>"
                '<p><a href="productpage?u=normal">Normal user</a></p>'
                '<p><a href="productpage?u=test">Test user</a></p></main>',
            ),
            content_type="text/html",
        )

    async def productpage(self, request: web.Request) -> web.Response:
        product_id = 0  # the only book
        user = request.cookies.get("user", "")
        details_status, details, _ = await self.details(request, product_id)
        reviews_status, reviews, reviews_version = await self.reviews(request, product_id)
        body = (
            _navbar(user)
            + "<main>"
            + _product(PRODUCTS[product_id])
            + '<div class="columns">'
            + _details(details_status, details)
            + _reviews(reviews_status, reviews, reviews_version)
            + "</div></main>"
        )
        return web.Response(text=_document("Simple Bookstore App", body), content_type="text/html")

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        username = str(form.get("username", "")).strip()
        response = web.HTTPFound("/productpage")
        if username:
            response.set_cookie("user", username, path="/")
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        response = web.HTTPFound("/productpage")
        response.del_cookie("user", path="/")
        raise response

    async def stylesheet(self, request: web.Request) -> web.Response:
        return web.Response(text=STYLESHEET.read_text(encoding="utf-8"), content_type="text/css")

    # The JSON API.

    async def products(self, request: web.Request) -> web.Response:
        return web.json_response(PRODUCTS)

    async def product(self, request: web.Request) -> web.Response:
        status, body, _ = await self.details(request, _product_id(request))
        return web.json_response(body, status=status)

    async def product_reviews(self, request: web.Request) -> web.Response:
        status, body, _ = await self.reviews(request, _product_id(request))
        return web.json_response(body, status=status)

    async def product_ratings(self, request: web.Request) -> web.Response:
        status, body, _ = await self.ratings(request, _product_id(request))
        return web.json_response(body, status=status)


def make_app(
    version: str = "v1",
    *,
    details_url: str | None = None,
    reviews_url: str | None = None,
    ratings_url: str | None = None,
) -> web.Application:
    page = ProductPage(
        details_url or service_url("details"),
        reviews_url or service_url("reviews"),
        ratings_url or service_url("ratings"),
    )
    app = base_app("productpage", version)
    app.router.add_get("/", page.index)
    app.router.add_get("/index.html", page.index)
    app.router.add_get("/productpage", page.productpage)
    app.router.add_post("/login", page.login)
    app.router.add_get("/logout", page.logout)
    app.router.add_get("/static/bookinfo.css", page.stylesheet)
    app.router.add_get("/api/v1/products", page.products)
    app.router.add_get("/api/v1/products/{id}", page.product)
    app.router.add_get("/api/v1/products/{id}/reviews", page.product_reviews)
    app.router.add_get("/api/v1/products/{id}/ratings", page.product_ratings)
    return app


# HTML, escaped by hand: the page is small and fixed.


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n"
        '<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n"
        '<link rel="stylesheet" href="static/bookinfo.css">\n'
        f"</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _navbar(user: str) -> str:
    if user:
        account = (
            f'<span class="user">{html.escape(user)}</span> '
            '<a href="logout" class="logout">sign out</a>'
        )
    else:
        account = (
            '<form method="post" action="login" class="login">'
            '<input type="text" name="username" placeholder="User Name"> '
            '<input type="password" name="passwd" placeholder="Password"> '
            '<button type="submit">Sign in</button></form>'
        )
    return f'<nav><a href="productpage" class="brand">BookInfo Sample</a>{account}</nav>'


def _product(product: dict[str, object]) -> str:
    # descriptionHtml is the product's own markup, as the original rendered it.
    return (
        f'<h1 class="title">{html.escape(str(product["title"]))}</h1>'
        f'<p class="summary">{product["descriptionHtml"]}</p>'
    )


def _details(status: int, details: object) -> str:
    if status != 200 or not isinstance(details, dict):
        error = details.get("error", "") if isinstance(details, dict) else ""
        return (
            '<div class="column details"><h4 class="error">Error fetching product details!</h4>'
            f'<p class="error">{html.escape(str(error))}</p></div>'
        )
    rows = "".join(
        f"<dt>{label}:</dt><dd>{html.escape(str(details.get(key, '')))}</dd>"
        for label, key in (
            ("Type", "type"),
            ("Pages", "pages"),
            ("Publisher", "publisher"),
            ("Language", "language"),
            ("ISBN-10", "ISBN-10"),
            ("ISBN-13", "ISBN-13"),
        )
    )
    return f'<div class="column details"><h4>Book Details</h4><dl>{rows}</dl></div>'


def _stars(rating: object) -> str:
    if not isinstance(rating, dict):
        return ""
    if "error" in rating:
        return f'<p class="error"><i>{html.escape(str(rating["error"]))}</i></p>'
    stars = rating.get("stars")
    if not isinstance(stars, int):
        return ""
    stars = max(0, min(5, stars))
    color = html.escape(str(rating.get("color", "black")))
    return (
        f'<span class="stars" data-stars="{stars}" data-color="{color}" '
        f'style="color: {color}">{"★" * stars}{"☆" * (5 - stars)}</span>'
    )


def _reviews(status: int, reviews: object, version: str | None) -> str:
    attribute = f' data-reviews-version="{html.escape(version)}"' if version else ""
    if status != 200 or not isinstance(reviews, dict):
        error = reviews.get("error", "") if isinstance(reviews, dict) else ""
        return (
            f'<div class="column reviews"{attribute}>'
            '<h4 class="error">Error fetching product reviews!</h4>'
            f'<p class="error">{html.escape(str(error))}</p></div>'
        )
    items = []
    for review in reviews.get("reviews", []):
        if not isinstance(review, dict):
            continue
        items.append(
            "<blockquote>"
            f"<p>{html.escape(str(review.get('text', '')))}</p>"
            f"<small>{html.escape(str(review.get('reviewer', '')))}</small>"
            f"{_stars(review.get('rating'))}"
            "</blockquote>"
        )
    return (
        f'<div class="column reviews"{attribute}><h4>Book Reviews</h4>'
        + "".join(items)
        + (f'<p class="served-by">served by {html.escape(version)}</p>' if version else "")
        + "</div>"
    )
