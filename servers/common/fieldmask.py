"""AIP-134 update masks: which fields of a resource an Update request changes."""

from __future__ import annotations

import re
from collections.abc import Collection

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from servers.common.errors import FieldViolation, InvalidArgument

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def _snake(path: str) -> str:
    return ".".join(_CAMEL.sub("_", part).lower() for part in path.split("."))


def _populated(message: Message, path: str) -> bool:
    field = message.DESCRIPTOR.fields_by_name[path.split(".")[0]]
    if field.is_repeated:
        return len(getattr(message, field.name)) > 0
    if field.type == FieldDescriptor.TYPE_MESSAGE or field.has_presence:
        return message.HasField(field.name)
    return bool(getattr(message, field.name))


def update_paths(
    mask: FieldMask,
    resource: Message,
    *,
    updatable: Collection[str],
    field: str = "update_mask",
) -> set[str]:
    """The validated set of paths to update.

    Paths may be snake_case or lowerCamelCase. `*` means every updatable field; an empty mask means
    every updatable field that is populated in `resource` (AIP-134). Unknown, output-only or immutable
    paths are INVALID_ARGUMENT, one field violation each.
    """
    if not mask.paths:
        return {path for path in updatable if _populated(resource, path)}
    paths: set[str] = set()
    violations = []
    known = resource.DESCRIPTOR.fields_by_name
    for index, raw in enumerate(mask.paths):
        if raw == "*":
            paths.update(updatable)
            continue
        path = _snake(raw)
        if path in updatable:
            paths.add(path)
        elif path.split(".")[0] in known:
            violations.append(FieldViolation(f"{field}.paths[{index}]", f"{raw!r} cannot be updated"))
        else:
            violations.append(FieldViolation(f"{field}.paths[{index}]", f"{raw!r} is not a field"))
    if violations:
        raise InvalidArgument("the update mask names fields that cannot be updated", violations=violations)
    return paths
