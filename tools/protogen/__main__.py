"""Generate the Python code for the mesh's contracts.

    python tools/protogen          regenerate libs/api/src/istio/api from proto/, and
                                   services/proxy/src/istio/proxy/envoy.py
    python tools/protogen --check  fail (exit 1) when the committed output is stale

protoc runs from grpcio-tools (pinned in uv.lock) with protobuf's Python generator, gRPC's
generator and mypy-protobuf for the .pyi stubs, so the output only depends on the lock file.
Envoy's protos are not generated here: they come from the xds-protos package. From their
descriptors, envoy_gen.py writes the proxy's decoding schema (the messages and fields listed in
envoy_subset.py) for istio.proxy.wire, so the sidecar needs neither protobuf nor Envoy's
descriptor tree at run time.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import envoy_gen  # type: ignore[import-not-found]
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
OUTPUT = ROOT / "libs" / "api" / "src" / "istio" / "api"
BIN = Path(sys.executable).parent

PACKAGE_DOC = '"""Generated from proto/ by tools/protogen: do not edit."""\n'


def include_dirs() -> list[Path]:
    """protoc's well-known types plus google/rpc from googleapis-common-protos."""
    well_known = Path(str(resources.files("grpc_tools") / "_proto"))
    import google.rpc.status_pb2 as status

    googleapis = Path(status.__file__).resolve().parents[2]
    return [PROTO_ROOT, well_known, googleapis]


def generate(out: Path) -> None:
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if not sources:
        raise SystemExit("protogen: no .proto files under proto/")
    args = [
        "grpc_tools.protoc",
        *(f"-I{d}" for d in include_dirs()),
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protogen: protoc failed (see above)")
    api = out / "istio" / "api"
    # Every generated directory is a regular package so that mypy and tools see one tree.
    for directory in [api, *(p for p in api.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").write_text(PACKAGE_DOC)
    (api / "py.typed").write_text("")
    for stale in sorted(api.rglob("*_pb2_grpc.py")):
        # gRPC's generator writes a module for every file; keep only those with services.
        if "class " not in stale.read_text():
            stale.unlink()
            stub = stale.with_suffix(".pyi")
            if stub.exists():
                stub.unlink()


def differences(a: Path, b: Path) -> list[str]:
    def files(root: Path) -> set[str]:
        # Bytecode caches (an import, or compileall before measuring) are not output.
        return {
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    left, right = files(a), files(b)
    stale = sorted(left ^ right)
    stale += sorted(n for n in left & right if not filecmp.cmp(a / n, b / n, shallow=False))
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(prog="tools/protogen", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when the output is stale")
    options = parser.parse_args()
    envoy = envoy_gen.source()
    envoy_name = envoy_gen.OUTPUT.relative_to(ROOT)
    if options.check:
        if not envoy_gen.OUTPUT.exists() or envoy_gen.OUTPUT.read_text() != envoy:
            print(f"protogen: {envoy_name} is stale; run `make protos`", file=sys.stderr)
            return 1
        print(f"protogen: {envoy_name} is current")
    else:
        envoy_gen.OUTPUT.write_text(envoy)
        print(f"protogen: wrote {envoy_name}")
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "istio" / "api"
        if options.check:
            stale = differences(fresh, OUTPUT) if OUTPUT.exists() else ["(missing)"]
            if stale:
                print("protogen: libs/api is stale; run `make protos`. Differs:", file=sys.stderr)
                for name in stale:
                    print(f"  {name}", file=sys.stderr)
                return 1
            print(f"protogen: libs/api is current ({len(list(fresh.rglob('*.py')))} modules)")
            return 0
        if OUTPUT.exists():
            shutil.rmtree(OUTPUT)
        shutil.copytree(fresh, OUTPUT)
        print(f"protogen: wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
