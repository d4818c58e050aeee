"""Compile schemas/containerd/*.proto into *_pb2.py and *_pb2.pyi with grpcio-tools (`make proto`).

`python -m schemas.containerd.compile [OUT_DIR]` writes under OUT_DIR (default: the repository root),
so a test can compile into a temporary directory and compare with what is checked in.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def proto_files() -> list[Path]:
    return sorted(HERE.glob("*.proto"))


def compile_protos(out_dir: Path) -> None:
    import grpc_tools  # type: ignore[import-untyped]
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
    args += [str(p.relative_to(ROOT)) for p in proto_files()]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on schemas/containerd/*.proto")


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT
    compile_protos(out)
    print(f"[proto] compiled {len(proto_files())} files into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
