"""Bookinfo through a stand-in sidecar: versions, forwarding, failures and the JSON API."""

from __future__ import annotations

import logging
import re

import pytest

from istio.bookinfo import productpage
from istio.bookinfo.common import VERSION_HEADER, service_url

from .conftest import Mesh

TRACE = {
    "x-request-id": "6b1f2d4c-0000-4000-8000-000000000001",
    "x-b3-traceid": "463ac35c9f6413ad",
    "x-b3-spanid": "a2fb4a1d1a96d312",
    "x-b3-parentspanid": "0020000000000001",
    "x-b3-sampled": "1",
    "x-b3-flags": "0",
    "x-ot-span-context": "463ac35c9f6413ad;a2fb4a1d1a96d312;0020000000000001;cs",
}
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"


def stars(page: str) -> list[tuple[str, str]]:
    """(count, color) of each star rating shown on the page."""
    return re.findall(r'class="stars" data-stars="(\d)" data-color="(\w+)"', page)


@pytest.mark.parametrize(
    ("workload", "expected"),
    [
        ("reviews-v1", []),
        ("reviews-v2", [("5", "black"), ("4", "black")]),
        ("reviews-v3", [("5", "red"), ("4", "red")]),
    ],
)
async def test_page_shows_the_reviews_version(
    mesh: Mesh, workload: str, expected: list[tuple[str, str]]
) -> None:
    mesh.route("reviews", workload)
    status, page = await mesh.page()
    assert status == 200
    assert f'data-reviews-version="{workload}"' in page
    assert stars(page) == expected
    assert ("★" in page) is bool(expected)
    assert "The Comedy of Errors" in page
    assert "PublisherA" in page
    assert "123-1234567890" in page
    assert "An extremely entertaining play by Shakespeare" in page
    assert "Error fetching" not in page
    # reviews v1 never asks ratings; v2 and v3 do, once per page.
    assert len(mesh.proxy.to("ratings")) == (0 if workload == "reviews-v1" else 1)


async def test_user_reaches_reviews_and_ratings_as_the_only_cookie(mesh: Mesh) -> None:
    mesh.route("reviews", "reviews-v2")
    status, page = await mesh.page(Cookie="session=abc; user=jason; theme=dark")
    assert status == 200
    assert '<span class="user">jason</span>' in page
    [to_reviews] = mesh.proxy.to("reviews")
    [to_ratings] = mesh.proxy.to("ratings")
    assert to_reviews.headers["cookie"] == "user=jason"
    assert to_ratings.headers["cookie"] == "user=jason"
    assert re.match(r"^(.*?;)?(user=jason)(;.*)?$", to_reviews.headers["cookie"])


async def test_no_user_no_cookie(mesh: Mesh) -> None:
    await mesh.page()
    assert all("cookie" not in f.headers for f in mesh.proxy.seen)


async def test_trace_headers_are_forwarded_on_every_call(mesh: Mesh) -> None:
    mesh.route("reviews", "reviews-v3")
    status, _ = await mesh.page(**TRACE)
    assert status == 200
    assert {f.host for f in mesh.proxy.seen} == {"details:9080", "reviews:9080", "ratings:9080"}
    for forwarded in mesh.proxy.seen:
        for name, value in TRACE.items():
            assert forwarded.headers.get(name) == value, (forwarded.host, name)


async def test_calls_go_to_plain_service_urls(mesh: Mesh) -> None:
    mesh.route("reviews", "reviews-v2")
    await mesh.page()
    assert [(f.host, f.path) for f in mesh.proxy.seen] == [
        ("details:9080", "/details/0"),
        ("reviews:9080", "/reviews/0"),
        ("ratings:9080", "/ratings/0"),
    ]


@pytest.mark.parametrize("how", ["no route", "app stopped", "503"])
async def test_ratings_down_shows_ratings_unavailable(mesh: Mesh, how: str) -> None:
    mesh.route("reviews", "reviews-v2")
    if how == "no route":
        mesh.unroute("ratings")
    elif how == "app stopped":
        await mesh.stop("ratings-v1")
    else:
        mesh.proxy.fail["ratings:9080"] = 1
    status, page = await mesh.page()
    assert status == 200
    assert page.count(RATINGS_UNAVAILABLE) == 2
    assert stars(page) == []
    assert 'data-reviews-version="reviews-v2"' in page


@pytest.mark.parametrize("how", ["no route", "app stopped"])
async def test_reviews_down_page_still_serves(mesh: Mesh, how: str) -> None:
    if how == "no route":
        mesh.unroute("reviews")
    else:
        await mesh.stop("reviews-v1")
    status, page = await mesh.page()
    assert status == 200
    assert "Error fetching product reviews!" in page
    assert REVIEWS_UNAVAILABLE in page
    assert "PublisherA" in page  # details still shown
    assert len(mesh.proxy.to("reviews")) == 2  # tried, and retried once


async def test_reviews_retried_once(mesh: Mesh) -> None:
    mesh.route("reviews", "reviews-v3")
    mesh.proxy.fail["reviews:9080"] = 1
    status, page = await mesh.page()
    assert status == 200
    assert stars(page) == [("5", "red"), ("4", "red")]
    assert len(mesh.proxy.to("reviews")) == 2


async def test_reviews_timeout_then_one_retry(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(productpage, "REVIEWS_TIMEOUT", 0.1)
    mesh.proxy.hold.add("reviews:9080")
    status, page = await mesh.page()
    assert status == 200
    assert REVIEWS_UNAVAILABLE in page
    assert len(mesh.proxy.to("reviews")) == 2


def test_original_timeouts() -> None:
    from istio.bookinfo import reviews

    assert productpage.DETAILS_TIMEOUT == 3.0
    assert productpage.REVIEWS_TIMEOUT == 3.0
    assert reviews.RATINGS_TIMEOUT == 10.0


async def test_details_down(mesh: Mesh) -> None:
    mesh.unroute("details")
    status, page = await mesh.page()
    assert status == 200
    assert "Error fetching product details!" in page
    assert "Sorry, product details are currently unavailable for this book." in page
    assert "Book Reviews" in page
    status, body = await mesh.get_json(f"{mesh.productpage}/api/v1/products/0")
    assert status == 503
    assert body == {"error": "Sorry, product details are currently unavailable for this book."}


async def test_api_products(mesh: Mesh) -> None:
    status, body = await mesh.get_json(f"{mesh.productpage}/api/v1/products")
    assert status == 200
    assert isinstance(body, list)
    assert [(p["id"], p["title"]) for p in body] == [(0, "The Comedy of Errors")]
    assert "Wikipedia Summary" in body[0]["descriptionHtml"]


async def test_api_product_details(mesh: Mesh) -> None:
    status, body = await mesh.get_json(f"{mesh.productpage}/api/v1/products/0")
    assert status == 200
    assert body == {
        "id": 0,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


@pytest.mark.parametrize(
    ("workload", "rating"),
    [
        ("reviews-v1", None),
        ("reviews-v2", [{"stars": 5, "color": "black"}, {"stars": 4, "color": "black"}]),
        ("reviews-v3", [{"stars": 5, "color": "red"}, {"stars": 4, "color": "red"}]),
    ],
)
async def test_api_product_reviews(
    mesh: Mesh, workload: str, rating: list[dict[str, object]] | None
) -> None:
    mesh.route("reviews", workload)
    status, body = await mesh.get_json(f"{mesh.productpage}/api/v1/products/0/reviews")
    assert status == 200
    assert isinstance(body, dict)
    assert set(body) == {"id", "reviews"}
    assert body["id"] == "0"
    assert [r["reviewer"] for r in body["reviews"]] == ["Reviewer1", "Reviewer2"]
    assert all(isinstance(r["text"], str) and r["text"] for r in body["reviews"])
    if rating is None:
        assert all("rating" not in r for r in body["reviews"])
    else:
        assert [r["rating"] for r in body["reviews"]] == rating


async def test_api_reviews_with_ratings_down(mesh: Mesh) -> None:
    mesh.route("reviews", "reviews-v3")
    mesh.unroute("ratings")
    status, body = await mesh.get_json(f"{mesh.productpage}/api/v1/products/0/reviews")
    assert status == 200
    assert isinstance(body, dict)
    assert [r["rating"] for r in body["reviews"]] == [{"error": RATINGS_UNAVAILABLE}] * 2


async def test_api_reviews_down(mesh: Mesh) -> None:
    mesh.unroute("reviews")
    status, body = await mesh.get_json(f"{mesh.productpage}/api/v1/products/0/reviews")
    assert status == 503
    assert body == {"error": REVIEWS_UNAVAILABLE}


async def test_api_product_ratings(mesh: Mesh) -> None:
    status, body = await mesh.get_json(
        f"{mesh.productpage}/api/v1/products/0/ratings", Cookie="user=jason"
    )
    assert status == 200
    assert body == {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    [to_ratings] = mesh.proxy.to("ratings")
    assert to_ratings.headers["cookie"] == "user=jason"
    mesh.unroute("ratings")
    status, body = await mesh.get_json(f"{mesh.productpage}/api/v1/products/0/ratings")
    assert (status, body) == (
        503,
        {"error": "Sorry, product ratings are currently unavailable for this book."},
    )


async def test_api_rejects_a_non_numeric_id(mesh: Mesh) -> None:
    for path in ("/api/v1/products/x", "/api/v1/products/x/reviews"):
        status, body = await mesh.get_json(mesh.productpage + path)
        assert status == 400
        assert body == {"error": "please provide numeric product id"}
    assert mesh.proxy.seen == []


async def test_backends_directly(mesh: Mesh) -> None:
    status, body = await mesh.get_json(f"{mesh.urls['details-v1']}/details/1")
    assert status == 200
    assert isinstance(body, dict)
    assert body["id"] == 1
    status, body = await mesh.get_json(f"{mesh.urls['ratings-v1']}/ratings/0")
    assert (status, body) == (200, {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})
    status, body = await mesh.get_json(f"{mesh.urls['reviews-v1']}/reviews/0")
    assert status == 200
    assert isinstance(body, dict)
    assert body["id"] == "0"


async def test_every_app_is_healthy_and_says_which_it_is(mesh: Mesh) -> None:
    for workload, url in mesh.urls.items():
        async with mesh.client.get(f"{url}/health") as response:
            assert response.status == 200, workload
            assert response.headers[VERSION_HEADER] == workload


async def test_login_and_logout(mesh: Mesh) -> None:
    async with mesh.client.post(
        f"{mesh.productpage}/login", data={"username": "jason"}, allow_redirects=False
    ) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/productpage"
        assert response.cookies["user"].value == "jason"
    async with mesh.client.get(f"{mesh.productpage}/logout", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/productpage"
        assert response.cookies["user"].value == ""
        assert response.cookies["user"]["max-age"] == "0"


async def test_static_stylesheet(mesh: Mesh) -> None:
    _status, page = await mesh.page()
    assert 'href="static/bookinfo.css"' in page
    async with mesh.client.get(f"{mesh.productpage}/static/bookinfo.css") as response:
        assert response.status == 200
        assert response.content_type == "text/css"
        assert "body" in await response.text()
    async with mesh.client.get(f"{mesh.productpage}/static/nothing.css") as response:
        assert response.status == 404


async def test_one_log_line_per_request_with_its_request_id(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    mesh.route("reviews", "reviews-v2")
    with caplog.at_level(logging.INFO, logger="istio.bookinfo"):
        await mesh.page(**TRACE)
    lines = [r.getMessage() for r in caplog.records if r.name == "istio.bookinfo"]
    assert len(lines) == 4
    for workload in ("productpage-v1", "details-v1", "reviews-v2", "ratings-v1"):
        [line] = [line for line in lines if line.startswith(workload + " ")]
        assert f"x-request-id={TRACE['x-request-id']}" in line
        assert " 200 " in line


def test_service_urls_from_the_environment() -> None:
    assert service_url("details", {}) == "http://details:9080"
    assert service_url("reviews", {"REVIEWS_HOSTNAME": "reviews.default"}) == (
        "http://reviews.default:9080"
    )
    assert service_url("ratings", {"RATINGS_HOSTNAME": "127.0.0.9", "RATINGS_PORT": "9999"}) == (
        "http://127.0.0.9:9999"
    )
