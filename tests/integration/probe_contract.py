"""Contracts for the test probe services: a compiled descriptor with `(far.api.v1.access)` on every method.

A server only serves methods whose contract declares who may call them (`servers/common/access.py`), so a
probe service registered by hand in a test needs a contract too. `declare_probe` builds one in memory
(requests and responses are `google.protobuf.StringValue`) and adds it to the default descriptor pool,
where `start_server` reads the declarations from, as it does those of `far.gamed.v1.GamedService`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from far.api.v1 import access_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, wrappers_pb2

Access = access_pb2.Access
PUBLIC = Access(level=Access.LEVEL_PUBLIC)
AUTHENTICATED = Access(level=Access.LEVEL_AUTHENTICATED)
STRING_VALUE = f".{wrappers_pb2.StringValue.DESCRIPTOR.full_name}"


class Kind(Enum):
    """(client streaming, server streaming) of a method."""

    UNARY = (False, False)
    SERVER_STREAM = (False, True)
    CLIENT_STREAM = (True, False)
    BIDI = (True, True)


def declare_probe(service: str, methods: Mapping[str, tuple[Kind, access_pb2.Access | None]]) -> None:
    """Add the contract of `service` (full name) to the default pool; a method with access None declares none.

    Idempotent: a service already in the pool is left as it is.
    """
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(service)
    except KeyError:
        pass
    else:
        return
    package, _, name = service.rpartition(".")
    file = descriptor_pb2.FileDescriptorProto(
        name=f"tests/{service.replace('.', '/')}.proto",
        package=package,
        syntax="proto3",
        dependency=[wrappers_pb2.DESCRIPTOR.name, access_pb2.DESCRIPTOR.name],
    )
    svc = file.service.add(name=name)
    for method_name, (kind, access) in methods.items():
        client_streaming, server_streaming = kind.value
        method = svc.method.add(
            name=method_name,
            input_type=STRING_VALUE,
            output_type=STRING_VALUE,
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )
        if access is not None:
            method.options.Extensions[access_pb2.access].CopyFrom(access)
    pool.AddSerializedFile(file.SerializeToString())
