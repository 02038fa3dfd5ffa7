"""The istioctl contract: round trips through every store, one precise line per problem,
exit 1 for user errors, and a store left unchanged by anything rejected.

istioctl runs as users run it: the installed console script, in its own process, against a
file store, a real etcd-server and the fake Kubernetes API server."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ISTIOCTL = str(Path(sys.executable).parent / "istioctl")


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Istioctl:
    store_url: str
    cwd: Path

    async def __call__(self, *args: str, stdin: str | None = None) -> Result:
        environment = {**os.environ, "ISTIO_CONFIG_STORE": self.store_url}
        process = await asyncio.create_subprocess_exec(
            ISTIOCTL,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.cwd,
            env=environment,
        )
        out, err = await asyncio.wait_for(
            process.communicate(stdin.encode() if stdin is not None else None), timeout=60
        )
        assert process.returncode is not None
        return Result(process.returncode, out.decode(), err.decode())


@pytest.fixture(params=["file", "etcd", "kube"])
async def istioctl(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Istioctl]:
    backend = request.param
    if backend == "file":
        yield Istioctl(f"file://{tmp_path / 'config'}", tmp_path)
    elif backend == "etcd":
        from istio.testing.etcd import EtcdServer

        async with EtcdServer(tmp_path / "etcd") as etcd:
            yield Istioctl(f"etcd://{etcd.host}:{etcd.port}/istio/config", tmp_path)
    else:
        from istio.testing.kube import FakeKubeAPI

        async with FakeKubeAPI() as api:
            yield Istioctl(f"kube://{api.write_kubeconfig(tmp_path / 'kubeconfig')}", tmp_path)


ALL_V1 = """\
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata:
  name: reviews-default
spec:
  destination:
    name: reviews
  precedence: 1
  route:
  - labels:
      version: v1
---
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata:
  name: ratings-test-delay
spec:
  destination:
    name: ratings
  precedence: 2
  match:
    request:
      headers:
        cookie:
          regex: ^(.*?;)?(user=jason)(;.*)?$
  route:
  - labels:
      version: v1
  httpFault:
    delay:
      percent: 100
      fixedDelay: 7s
"""

BAD_WEIGHTS = """\
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata:
  name: reviews-split
spec:
  destination:
    name: reviews
  route:
  - labels: {version: v1}
    weight: 50
  - labels: {version: v3}
    weight: 40
"""


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


async def test_create_get_round_trip(istioctl: Istioctl) -> None:
    rules = write(istioctl.cwd, "rules.yaml", ALL_V1)
    created = await istioctl("create", "-f", rules)
    assert created.code == 0, created.err
    assert "Created config route-rule/default/reviews-default at revision" in created.out
    assert "Created config route-rule/default/ratings-test-delay at revision" in created.out

    got = await istioctl("get", "route-rules", "-o", "yaml")
    assert got.code == 0, got.err
    documents = list(yaml.safe_load_all(got.out))
    written = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all(ALL_V1)}
    assert {d["metadata"]["name"]: d["spec"] for d in documents} == written
    assert all(d["metadata"]["resourceVersion"] for d in documents)

    short = await istioctl("get", "routerule")
    assert short.out.splitlines()[0].split() == ["NAME", "KIND", "NAMESPACE"]
    assert ["reviews-default", "RouteRule.config.istio.io", "default"] in [
        line.split() for line in short.out.splitlines()
    ]

    one = await istioctl("get", "RouteRule", "ratings-test-delay", "-o", "json")
    assert '"fixedDelay": "7s"' in one.out


async def test_replace_and_delete(istioctl: Istioctl) -> None:
    rules = write(istioctl.cwd, "rules.yaml", ALL_V1)
    assert (await istioctl("create", "-f", rules)).code == 0
    changed = write(
        istioctl.cwd, "changed.yaml", ALL_V1.replace("fixedDelay: 7s", "fixedDelay: 2s")
    )
    replaced = await istioctl("replace", "-f", changed)
    assert replaced.code == 0, replaced.err
    assert "Updated config route-rule/default/ratings-test-delay" in replaced.out
    assert (
        "fixedDelay: 2s"
        in (await istioctl("get", "route-rule", "ratings-test-delay", "-o", "yaml")).out
    )

    deleted = await istioctl("delete", "route-rule", "reviews-default")
    assert deleted.code == 0, deleted.err
    deleted = await istioctl("delete", "-f", changed)
    assert deleted.code == 1
    assert "RouteRule default/reviews-default: not found" in deleted.err
    assert (await istioctl("get", "route-rules", "-o", "json")).out.strip() == "[]"


async def test_rejected_input_changes_nothing(istioctl: Istioctl) -> None:
    good = write(istioctl.cwd, "good.yaml", ALL_V1)
    bad = write(istioctl.cwd, "bad.yaml", BAD_WEIGHTS)
    result = await istioctl("create", "-f", good, "-f", bad)
    assert result.code == 1
    assert result.err.strip().splitlines() == [
        f"Error: {bad}: document 1: RouteRule default/reviews-split: spec.route: "
        "route weights must sum to 100, got 90"
    ]
    assert "Traceback" not in result.err
    assert (await istioctl("get", "route-rules", "-o", "json")).out.strip() == "[]"

    assert (await istioctl("create", "-f", good)).code == 0
    again = await istioctl("create", "-f", good)
    assert again.code == 1
    assert "RouteRule default/reviews-default: already exists" in again.err
    missing = await istioctl(
        "replace",
        "-f",
        write(istioctl.cwd, "new.yaml", BAD_WEIGHTS.replace("weight: 40", "weight: 50")),
    )
    assert missing.code == 1
    assert "RouteRule default/reviews-split: not found" in missing.err


async def test_unknown_kind_and_missing_file(istioctl: Istioctl) -> None:
    result = await istioctl("get", "routerul")
    assert result.code == 1
    assert result.err.strip() == "Error: unknown kind 'routerul'; did you mean RouteRule?"
    result = await istioctl("create", "-f", str(istioctl.cwd / "nope.yaml"))
    assert result.code == 1
    assert "nope.yaml: cannot read: No such file or directory" in result.err


async def test_validate_reads_stdin_and_needs_no_store(istioctl: Istioctl) -> None:
    result = await istioctl("validate", "-f", "-", stdin=ALL_V1)
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        "route-rule/default/reviews-default: valid",
        "route-rule/default/ratings-test-delay: valid",
    ]
    result = await istioctl("validate", "-f", "-", stdin=BAD_WEIGHTS)
    assert result.code == 1
    assert "<stdin>: document 1: RouteRule default/reviews-split: spec.route" in result.err
