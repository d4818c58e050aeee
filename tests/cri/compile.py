"""Compile tests/cri/api.proto into api_pb2.py, api_pb2.pyi and api_pb2_grpc.py with grpcio-tools.

`python -m tests.cri.compile [OUT_DIR]` writes under OUT_DIR (default: the repository root), so a test
can compile into a temporary directory and compare with what is checked in (tests/unit/test_cri_protos.py).
The proto is compiled by its path from the repository root, so the generated stubs import each other as
`tests.cri.api_pb2`.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROTO = HERE / "api.proto"
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def compile_protos(out_dir: Path) -> None:
    """Write tests/cri/api_pb2{.py,.pyi,_grpc.py} under out_dir. Raises SystemExit if protoc fails."""
    import grpc_tools  # type: ignore[import-untyped]
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(PROTO.relative_to(ROOT))]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO.relative_to(ROOT)}")


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT
    compile_protos(out)
    print(f"[proto] compiled {PROTO.relative_to(ROOT)} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
