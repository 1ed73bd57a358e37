"""Regenerate the gRPC modules from ``control.proto``: ``python -m services.control.generate``.

The generated ``control_pb2.py``, ``control_pb2.pyi`` and ``control_pb2_grpc.py`` are committed,
so running the service needs no protoc; this module is the one way to rebuild them, and the tests
compare its output with the committed files, so the proto and the code cannot drift apart.

protoc runs with the repository root as include path, so the generated import reads
``from services.control import control_pb2`` and needs no rewriting. The only change to protoc's
output is a ``# ruff: noqa`` first line: generated code is not held to the project's lint rules.

``--check`` regenerates into a temporary directory and exits 1 when the committed files differ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the include path: the proto is services/control/control.proto
PROTO = "services/control/control.proto"
GENERATED = ("control_pb2.py", "control_pb2.pyi", "control_pb2_grpc.py")
HEADER = "# ruff: noqa\n"


def generate(out_dir: str | Path | None = None) -> list[Path]:
    """Write the generated modules into ``out_dir`` (default: next to the proto)."""
    from grpc_tools import protoc  # a dev dependency: only needed to regenerate

    out = Path(out_dir) if out_dir is not None else HERE
    with tempfile.TemporaryDirectory() as tmp:
        include = str(Path(protoc.__file__).parent / "_proto")  # well-known types
        rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={tmp}",
                          f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(ROOT / PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "services" / "control" / name).read_text()
            target = out / name
            target.write_text(HEADER + text)
            written.append(target)
    return written


def proto_descriptor() -> bytes:
    """``control.proto`` compiled to its serialized FileDescriptorProto.

    It equals ``control_pb2.DESCRIPTOR.serialized_pb`` whenever the committed code was generated
    from this proto, whatever the grpcio-tools version (those change the code around it).
    """
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "control.desc"
        rc = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--descriptor_set_out={out}",
                          str(ROOT / PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
        proto = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]

    def drop_json_names(messages):  # the generated code leaves them out
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            drop_json_names(message.nested_type)

    drop_json_names(proto.message_type)
    return proto.SerializeToString()


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        return [name for name in GENERATED
                if not (HERE / name).is_file()
                or (HERE / name).read_bytes() != (Path(tmp) / name).read_bytes()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.control.generate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only report whether the committed files are up to date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"out of date with {PROTO}: {', '.join(stale)} "
                  "(run: python -m services.control.generate)", file=sys.stderr)
            return 1
        print(f"generated files match {PROTO}")
        return 0
    for path in generate():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
