"""Generate Python code from protos/ with grpcio-tools: ``python -m serving.protogen``.

Output goes to ``serving/gen/`` (committed). protoc writes absolute imports
(``from classifier.v1 import classifier_pb2``); they are rewritten to the
package path so the generated code needs nothing on ``sys.path``. A test
regenerates into a temporary folder and fails if the committed code is stale.
Run it in its own process: protoc's C++ runtime must not meet TensorFlow's in one
process (they crash together).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GEN_PACKAGE = "serving.gen"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    rc = protoc.main(
        ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *files]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc})")
    written = []
    for f in sorted(out.rglob("*.py*")):
        if f.suffix not in (".py", ".pyi"):
            continue
        text = f.read_text()
        fixed = re.sub(r"^from (classifier(?:\.\w+)*) import", rf"from {GEN_PACKAGE}.\1 import", text, flags=re.M)
        f.write_text(fixed)
        written.append(f)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m serving.protogen")
    p.add_argument("--out", type=Path, default=ROOT / "serving" / "gen", help="output folder (default: serving/gen)")
    out = p.parse_args(argv).out
    for f in generate(out):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
