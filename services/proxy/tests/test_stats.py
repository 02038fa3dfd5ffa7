"""Stats exported by one worker and absorbed by another render as their sum."""

from __future__ import annotations

import json

from istio.proxy.stats import Stats


def _busy(stats: Stats, scale: int) -> None:
    http = stats.http_stats("outbound_0.0.0.0_15001")
    http.cx_total += scale
    http.cx_active += 1
    for _ in range(scale):
        http.completed(200, 3.0)
    http.completed(503, 700.0)
    cluster = stats.cluster_stats("outbound|9080||reviews.default.svc.cluster.local")
    cluster.cx_total += 2 * scale
    cluster.completed(200, 2.0)
    stats.listener_accepted("127.0.0.2:15001")
    stats.tcp_stats("mongo").cx_rx_bytes_total += 100 * scale
    redis = stats.protocol_stats("redis", "cache")
    redis.count("upstream_rq_total", scale)
    redis.command("get").total += scale
    redis.reply("get", 0.0, 0.002, error=False)


def test_absorbed_exports_render_as_the_sum_of_the_workers() -> None:
    workers = [Stats(), Stats(), Stats()]
    for scale, stats in enumerate(workers, start=1):
        _busy(stats, scale)
    merged = Stats()
    for stats in workers:
        # Through JSON, as the export crosses the process boundary.
        merged.absorb(json.loads(json.dumps(stats.export())))
    text = merged.text()
    assert "http.outbound_0.0.0.0_15001.downstream_rq_total: 9\n" in text  # 1+2+3 + 3 x 503
    assert "http.outbound_0.0.0.0_15001.downstream_rq_5xx: 3\n" in text
    assert "http.outbound_0.0.0.0_15001.downstream_cx_active: 3\n" in text
    assert "upstream_cx_total: 12\n" in text
    assert "listener.127.0.0.2:15001.downstream_cx_total: 3\n" in text
    assert "tcp.mongo.downstream_cx_rx_bytes_total: 600\n" in text
    assert "redis.cache.upstream_rq_total: 6\n" in text
    assert "redis.cache.command.get.total: 6\n" in text
    prometheus = merged.prometheus()
    prefix = 'envoy_http_conn_manager_prefix="outbound_0.0.0.0_15001"'
    assert f'envoy_http_downstream_rq_time_bucket{{{prefix},le="5"}} 6\n' in prometheus
    assert f'envoy_http_downstream_rq_time_bucket{{{prefix},le="1000"}} 9\n' in prometheus
    assert f"envoy_http_downstream_rq_time_count{{{prefix}}} 9\n" in prometheus
    assert f"envoy_http_downstream_rq_time_sum{{{prefix}}} 2118\n" in prometheus


def test_absorbing_into_a_live_stats_keeps_its_own_counts() -> None:
    own, other = Stats(), Stats()
    _busy(own, 1)
    _busy(other, 1)
    before = own.export()
    own.absorb(other.export())
    after = own.export()
    assert (
        after["http"]["outbound_0.0.0.0_15001"]["rq_total"]
        == 2 * (before["http"]["outbound_0.0.0.0_15001"]["rq_total"])
    )


def test_an_unknown_field_from_another_version_is_ignored() -> None:
    worker = Stats()
    _busy(worker, 1)
    state = worker.export()
    state["http"]["outbound_0.0.0.0_15001"]["rq_from_the_future"] = 7
    merged = Stats()
    merged.absorb(state)
    assert merged.http_stats("outbound_0.0.0.0_15001").rq_total == 2


async def test_workers_answer_over_their_channel_and_a_dead_one_is_left_out() -> None:
    import asyncio
    import socket
    from typing import cast

    from istio.proxy.workers import Worker, merged_stats, serve_stats

    class _Process:
        pid = 4242

    own, live = Stats(), Stats()
    _busy(own, 1)
    _busy(live, 2)
    ours, theirs = socket.socketpair()
    serving = asyncio.get_running_loop().create_task(serve_stats(theirs.detach(), live))
    gone_ours, gone_theirs = socket.socketpair()
    gone_theirs.close()  # a worker that died
    process = cast(asyncio.subprocess.Process, _Process())
    workers = [Worker(process, ours), Worker(process, gone_ours)]
    for _ in range(2):  # the channel serves question after question
        total = await merged_stats(own, workers, answer_within=5)
        assert total.http_stats("outbound_0.0.0.0_15001").rq_total == 2 + 3
    assert own.http_stats("outbound_0.0.0.0_15001").rq_total == 2  # own stats untouched
    assert (workers[0].gone, workers[1].gone) == (False, True)
    serving.cancel()
    for worker in workers:
        worker.close()
