"""`mixs build`: a custom Mixer with the sample adapter (samples/mixer-adapter), built as
wheels and a virtualenv, then run: its Checks go through the sample adapter."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from istio.api.mixer.v1 import check_pb2, service_pb2_grpc
from istio.mixerclient.attributes import encode
from istio.testing.net import free_port

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "samples" / "mixer-adapter"

CONFIG = """
apiVersion: config.istio.io/v1alpha2
kind: prefixlist
metadata: {name: paths, namespace: istio-system}
spec: {prefixes: [/api/, /health], statusCode: 7}
---
apiVersion: config.istio.io/v1alpha2
kind: listentry
metadata: {name: path, namespace: istio-system}
spec: {value: request.path}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: onlyapi, namespace: istio-system}
spec:
  actions: [{handler: paths.prefixlist, instances: [path.listentry]}]
"""


async def test_build_a_mixer_with_the_sample_adapter_and_run_it(tmp_path: Path) -> None:
    out = tmp_path / "custom"
    built = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "istio.mixer", "build", "--adapter", str(SAMPLE), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    mixs = out / "venv" / "bin" / "mixs"
    assert built.stdout.strip() == f"built {mixs} (wheels in {out / 'wheels'})"
    wheels = sorted(p.name.split("-")[0] for p in (out / "wheels").glob("*.whl"))
    assert "istio_sample_mixer_adapter" in wheels
    assert "istio_mixer" in wheels
    config = tmp_path / "config"
    config.mkdir()
    (config / "policy.yaml").write_text(CONFIG)
    grpc_port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(mixs),
        "server",
        "--config-store",
        f"file://{config}",
        "--grpc-addr",
        f"127.0.0.1:{grpc_port}",
        "--monitoring-addr",
        f"127.0.0.1:{free_port()}",
        "--prometheus-addr",
        f"127.0.0.1:{free_port()}",
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,  # not the source tree: the venv alone must carry Mixer and the adapter
    )
    try:
        assert process.stderr is not None
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, "the built mixs exited before its config was in force"
            if b"config generation 1 in force" in line:
                break
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = service_pb2_grpc.MixerStub(channel)
            denied = await stub.Check(
                check_pb2.CheckRequest(attributes=encode({"request.path": "/admin"}))
            )
            allowed = await stub.Check(
                check_pb2.CheckRequest(attributes=encode({"request.path": "/api/v1"}))
            )
        assert (denied.precondition.status.code, denied.precondition.status.message) == (
            7,
            "paths.prefixlist.istio-system:/admin starts with none of /api/, /health",
        )
        assert allowed.precondition.status.code == 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0


def test_build_refuses_a_project_without_an_adapter(tmp_path: Path) -> None:
    project = tmp_path / "notadapter"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "not-an-adapter"\nversion = "1"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "istio.mixer",
            "build",
            "--adapter",
            str(project),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"mixs: error: {project}/pyproject.toml declares no adapter: add "
        '[project.entry-points."istio.mixer.adapters"] NAME = "module:INFO"\n'
    )
