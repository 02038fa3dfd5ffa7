"""Bookinfo, Istio's sample application, on aiohttp: four services that call each other.

common.py       what every app shares: /health, per-request logging, trace-header forwarding,
                the outbound client session (HTTP_PROXY honoured), the peers' URLs
productpage.py  the HTML page, /login, /logout, /static and the /api/v1/products JSON API
details.py      /details/<id>
reviews.py      /reviews/<id>, v1 without stars, v2 black and v3 red stars from ratings
ratings.py      /ratings/<id>
__main__.py     python -m istio.bookinfo SERVICE [--version v1|v2|v3] --host HOST --port PORT
"""

from __future__ import annotations

SERVICES = ("productpage", "details", "reviews", "ratings")
