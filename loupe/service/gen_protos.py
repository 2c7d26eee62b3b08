"""Regenerate the loupe.v1 stubs: ``python -m loupe.service.gen_protos [OUT_DIR]`` (``make protos``).

The .proto files live in ``loupe/service/proto/loupe/v1/`` and import each other as
``loupe/v1/<name>.proto`` (the path other languages use too). protoc's Python output then says
``from loupe.v1 import ...``; those imports are rewritten to ``loupe.service.proto.loupe.v1`` so the
stubs import from inside this package. The generated files are committed; a test regenerates them
into a temporary directory and compares.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent / "proto"
PACKAGE_DIR = PROTO_ROOT / "loupe" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_IMPORT = re.compile(r"^from loupe\.v1 import ", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto into ``out_dir``/loupe/v1 -> the generated files."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).resolve().parent / "_proto"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see its message above")
        written = []
        target = out_dir / "loupe" / "v1"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted((Path(tmp) / "loupe" / "v1").iterdir()):
            if not path.name.endswith(SUFFIXES):
                continue
            text = _IMPORT.sub("from loupe.service.proto.loupe.v1 import ", path.read_text())
            (target / path.name).write_text(text)
            written.append(target / path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else PROTO_ROOT
    for path in generate(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
