"""Regenerates the committed Python code for pdserve's protobuf and gRPC definitions.

    python protos/generate.py            # rewrite protos/pdserve/v1/*_pb2*.py{,i} in place
    python protos/generate.py --out DIR  # write DIR/protos/pdserve/v1/... instead

The .proto files are compiled with the repository root as the import root, so a proto imports
another as "protos/pdserve/v1/x.proto" and the generated code imports it as
`from protos.pdserve.v1 import x_pb2`: it works from a checkout (repo root on sys.path) and once
installed, with no rewriting of the output. tests/serving/test_protos.py fails when the
committed files differ from a fresh run, i.e. when someone edited a .proto and forgot this.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos" / "pdserve" / "v1"
MESSAGE_SUFFIXES = ("_pb2.py", "_pb2.pyi")
SERVICE_SUFFIX = "_pb2_grpc.py"  # written only for .proto files that declare a service


def proto_files() -> list[Path]:
    """The .proto sources, in a stable order."""
    return sorted(PROTO_DIR.glob("*.proto"))


def declares_service(proto: Path) -> bool:
    return re.search(r"^service\s", proto.read_text(), flags=re.MULTILINE) is not None


def generated_files(root: Path) -> list[Path]:
    """Every file a run writes under `root` (the repo root, or a scratch --out directory)."""
    out_dir = root / PROTO_DIR.relative_to(REPO_ROOT)
    files = []
    for proto in proto_files():
        suffixes = MESSAGE_SUFFIXES + ((SERVICE_SUFFIX,) if declares_service(proto) else ())
        files.extend(out_dir / (proto.stem + suffix) for suffix in suffixes)
    return files


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto; returns the files written."""
    from grpc_tools import protoc  # test/dev dependency only

    (out_root / PROTO_DIR.relative_to(REPO_ROOT)).mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    for proto in proto_files():
        outputs = [f"--python_out={out_root}", f"--pyi_out={out_root}"]
        if declares_service(proto):
            outputs.append(f"--grpc_python_out={out_root}")
        args = ["grpc_tools.protoc", f"--proto_path={REPO_ROOT}", f"--proto_path={well_known}",
                *outputs, str(proto.relative_to(REPO_ROOT))]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto.relative_to(REPO_ROOT)}")
    return generated_files(out_root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
