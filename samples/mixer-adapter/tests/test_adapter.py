"""The sample adapter: its declaration, its handler's answers, and that Mixer finds it."""

from __future__ import annotations

import logging

from istio.mixersdk import Env, ListEntryInstance, discover, implements, parse_params
from istio.sampleadapter import INFO, PARAMS


async def test_prefixes_pass_and_the_rest_is_denied() -> None:
    params, problems = parse_params(PARAMS, {"prefixes": ["/api/", "/health"], "statusCode": 16})
    assert problems == []
    handler = await INFO.build(params, Env("paths.prefixlist.istio-system", logging.getLogger()))
    assert implements(handler, "listentry")
    assert handler.handle_list_entry(ListEntryInstance("path", "/api/v1")).ok
    denied = handler.handle_list_entry(ListEntryInstance("path", "/admin"))
    assert (denied.status_code, denied.message) == (16, "/admin starts with none of /api/, /health")
    await handler.close()


def test_the_adapter_is_declared_well_and_installed_as_an_entry_point() -> None:
    assert INFO.problems() == []
    adapters, _ = discover()
    assert adapters["prefixlist"] is INFO
