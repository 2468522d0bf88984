"""Regenerate the Python modules for protos/*.proto into swarm/proto/.

Run `python protos/generate.py` after editing a .proto file; tests/swarm/test_protos.py fails while the
checked-in modules differ from what this script produces.
"""

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
OUTPUT_DIR = PROTO_DIR.parent / "swarm" / "proto"
PROTO_FILES = ("control.proto", "blocks.proto")


def generate(output_dir: Path) -> None:
    """Write *_pb2.py and *_pb2_grpc.py for every proto file into output_dir."""
    output_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={output_dir}",
        f"--grpc_python_out={output_dir}",
        *(str(PROTO_DIR / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for grpc_module in output_dir.glob("*_pb2_grpc.py"):
        # protoc writes `import control_pb2`; inside the package it must be a relative import.
        text = grpc_module.read_text()
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.MULTILINE)
        grpc_module.write_text(text)


def generated_files(output_dir: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(output_dir.glob("*_pb2*.py"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if swarm/proto is stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUTPUT_DIR)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if generated_files(Path(tmp)) != generated_files(OUTPUT_DIR):
            sys.exit("swarm/proto is stale: run `python protos/generate.py`")


if __name__ == "__main__":
    main()
