"""reviews: v1 without stars, v2 with black and v3 with red stars, both asking ratings."""

from __future__ import annotations

from aiohttp import web

from istio.bookinfo.common import base_app, get_json, service_url

REVIEWS = (
    (
        "Reviewer1",
        "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
    ),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared to other "
        "plays by Shakespeare.",
    ),
)
STAR_COLORS = {"v1": None, "v2": "black", "v3": "red"}
RATINGS_TIMEOUT = 10.0  # seconds, so a 7 s delay on ratings still answers (the lesson of 0.2)
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"


def make_app(version: str = "v1", ratings_url: str | None = None) -> web.Application:
    if version not in STAR_COLORS:
        raise ValueError(f"reviews has versions {', '.join(STAR_COLORS)}, not {version!r}")
    color = STAR_COLORS[version]
    ratings_base = ratings_url or service_url("ratings")

    async def reviews(request: web.Request) -> web.Response:
        try:
            product_id = int(request.match_info["id"])
        except ValueError:
            return web.json_response({"error": "please provide numeric product ID"}, status=400)
        stars: dict[str, object] | None = None
        if color is not None:
            status, body, _ = await get_json(
                request, f"{ratings_base}/ratings/{product_id}", time_limit=RATINGS_TIMEOUT
            )
            if status == 200 and isinstance(body, dict) and isinstance(body.get("ratings"), dict):
                stars = body["ratings"]
        result = []
        for reviewer, text in REVIEWS:
            review: dict[str, object] = {"reviewer": reviewer, "text": text}
            if color is not None:
                if stars is not None and isinstance(stars.get(reviewer), int):
                    review["rating"] = {"stars": stars[reviewer], "color": color}
                else:
                    review["rating"] = {"error": RATINGS_UNAVAILABLE}
            result.append(review)
        return web.json_response({"id": str(product_id), "reviews": result})

    app = base_app("reviews", version)
    app.router.add_get("/reviews/{id}", reviews)
    return app
