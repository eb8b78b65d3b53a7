"""Message classes built from this project's .proto files (hstu/config/protos/) at import time.

No generated *_pb2.py is committed: protoc (from grpcio-tools) compiles the .proto files into a
FileDescriptorSet, which goes into a private DescriptorPool, and the classes come from
message_factory. A protobuf upgrade therefore never meets stale generated code, and the private
pool keeps these `hstu.config.*` types away from anything else in the process.
"""

from __future__ import annotations

import functools
import importlib.resources
import tempfile
from pathlib import Path

from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "hstu.config"
PROTO_DIR = Path(__file__).resolve().parent / "protos"


@functools.cache
def pool() -> descriptor_pool.DescriptorPool:
    """The descriptor pool holding every hstu.config message (compiled once per process)."""
    # grpc_tools is imported here, not at module level, so that a missing grpcio-tools shows up
    # as a clear error only when configs are actually used.
    from grpc_tools import protoc

    proto_files = sorted(str(path) for path in PROTO_DIR.glob("*.proto"))
    if not proto_files:
        raise RuntimeError(f"no .proto files found in {PROTO_DIR}")
    # protoc needs grpc_tools' bundled google/protobuf/*.proto only if a file imports one; add
    # the include path anyway so that such an import keeps working.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hstu_config.desc"
        status = protoc.main(
            [
                "protoc",
                f"-I{PROTO_DIR}",
                f"-I{well_known}",
                f"--descriptor_set_out={out}",
                "--include_imports",
                *proto_files,
            ]
        )
        if status != 0:
            raise RuntimeError(
                f"protoc failed (exit {status}) on {PROTO_DIR}; its messages are above"
            )
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    result = descriptor_pool.DescriptorPool()
    # --include_imports lists files dependencies first, the order the pool needs.
    for file_proto in descriptor_set.file:
        result.AddSerializedFile(file_proto.SerializeToString())
    return result


def message_descriptor(name: str) -> descriptor.Descriptor:
    """Descriptor of hstu.config.<name>, e.g. message_descriptor("STU")."""
    return pool().FindMessageTypeByName(f"{PACKAGE}.{name}")


@functools.cache
def message_class(name: str) -> type:
    """The message class of hstu.config.<name>, e.g. message_class("EasyRecConfig")."""
    return message_factory.GetMessageClass(message_descriptor(name))


def enum_value(enum: str, name: str) -> int:
    """Number of value `name` of enum hstu.config.<enum>: enum_value("Kernel", "TRITON") == 0."""
    return pool().FindEnumTypeByName(f"{PACKAGE}.{enum}").values_by_name[name].number


def enum_name(enum: str, number: int) -> str:
    """Name of value `number` of enum hstu.config.<enum>: enum_name("Kernel", 0) == "TRITON"."""
    return pool().FindEnumTypeByName(f"{PACKAGE}.{enum}").values_by_number[number].name
