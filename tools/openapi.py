"""Write the OpenAPI 3.0.3 document of the FAR HTTP/JSON API from a protobuf descriptor set.

Envoy transcodes JSON <-> gRPC from the `google.api.http` rules of the contracts in `protos/far/`, so the
document is derived from the same descriptor set Envoy loads (written by protoc with `--include_imports
--include_source_info`): one operation per HTTP binding of every `far.*` service method, schemas in the
proto3 JSON mapping, descriptions from the proto comments.

    python -m tools.openapi DESCRIPTOR OUT

Path templates such as `/v1/{name=games/*/builds/*}` become `/v1/games/{game}/builds/{build}`: one path
parameter per wildcard, named after the variables of the `google.api.resource` pattern the template matches
(`games/{game}/builds/{build}`), else after the singular of the collection segment before it. The
operation's `x-grpc-path-bindings` maps each bound request field (JSON path) to the template its
parameters make up. Server-streaming methods (`x-grpc-streaming: server`) answer with the JSON array of
the stream's messages (Envoy's default) or newline-delimited JSON; client-streaming ones take a JSON
array of request messages.

The output is deterministic: sorted keys, two-space indent, a trailing newline and nothing that depends
on the time or the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Imported for their side effect as well: the extensions must be registered before the descriptor set is
# parsed, so that the options come out as extensions rather than unknown fields.
from google.api import annotations_pb2, field_behavior_pb2, resource_pb2
from google.protobuf import descriptor_pb2

__all__ = ["build_openapi", "main", "render_openapi", "write_openapi"]

Json = dict[str, Any]
FieldProto = descriptor_pb2.FieldDescriptorProto

OPENAPI_VERSION = "3.0.3"
TITLE = "FAR platform API"
API_VERSION = "v1"
FAR_PACKAGE = "far"
STATUS = "google.rpc.Status"
ERROR_DETAILS = ("google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.RetryInfo")
OPENAPI_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
JSON_MEDIA = "application/json"
NDJSON_MEDIA = "application/x-ndjson"

# Field numbers used in source_code_info paths (descriptor.proto).
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

_INT64_PATTERN = r"^-?[0-9]+$"
_UINT64_PATTERN = r"^[0-9]+$"
_UINT32_MAX = 4294967295

_SCALARS: dict[int, Json] = {
    FieldProto.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldProto.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldProto.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": _UINT32_MAX},
    FieldProto.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": _UINT32_MAX},
    FieldProto.TYPE_INT64: {"type": "string", "format": "int64", "pattern": _INT64_PATTERN},
    FieldProto.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": _INT64_PATTERN},
    FieldProto.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": _INT64_PATTERN},
    FieldProto.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": _UINT64_PATTERN},
    FieldProto.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": _UINT64_PATTERN},
    FieldProto.TYPE_BOOL: {"type": "boolean"},
    FieldProto.TYPE_STRING: {"type": "string"},
    FieldProto.TYPE_BYTES: {"type": "string", "format": "byte"},
}

_ANY_SCHEMA: Json = {
    "type": "object",
    "description": (
        "A message of any type: its fields in the proto3 JSON mapping plus `@type`, the type URL "
        "(`type.googleapis.com/google.rpc.ErrorInfo`). Well-known types carry their JSON form in `value`."
    ),
    "properties": {"@type": {"type": "string", "description": "The type URL of the message."}},
    "required": ["@type"],
    "additionalProperties": True,
}


def _wrapper(schema: Json) -> Json:
    return {**schema, "nullable": True}


# The proto3 JSON mapping of the well-known types, inlined wherever they are used.
_WELL_KNOWN: dict[str, Json] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "example": "3.5s",
    },
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Any": _ANY_SCHEMA,
    "google.protobuf.DoubleValue": _wrapper(_SCALARS[FieldProto.TYPE_DOUBLE]),
    "google.protobuf.FloatValue": _wrapper(_SCALARS[FieldProto.TYPE_FLOAT]),
    "google.protobuf.Int64Value": _wrapper(_SCALARS[FieldProto.TYPE_INT64]),
    "google.protobuf.UInt64Value": _wrapper(_SCALARS[FieldProto.TYPE_UINT64]),
    "google.protobuf.Int32Value": _wrapper(_SCALARS[FieldProto.TYPE_INT32]),
    "google.protobuf.UInt32Value": _wrapper(_SCALARS[FieldProto.TYPE_UINT32]),
    "google.protobuf.BoolValue": _wrapper(_SCALARS[FieldProto.TYPE_BOOL]),
    "google.protobuf.StringValue": _wrapper(_SCALARS[FieldProto.TYPE_STRING]),
    "google.protobuf.BytesValue": _wrapper(_SCALARS[FieldProto.TYPE_BYTES]),
}
# What the JSON form of a well-known type looks like, appended to the description of a field of that type.
_WELL_KNOWN_NOTES: dict[str, str] = {
    "google.protobuf.Timestamp": "JSON: an RFC 3339 timestamp, e.g. `2024-05-01T12:00:00Z`.",
    "google.protobuf.Duration": "JSON: seconds with up to 9 decimals and an `s` suffix, e.g. `3.5s`.",
    "google.protobuf.FieldMask": (
        "JSON: a comma-separated string of lowerCamelCase field paths, e.g. `displayName,genres`."
    ),
    "google.protobuf.Value": "JSON: any value.",
    "google.protobuf.Struct": "JSON: an object.",
    "google.protobuf.ListValue": "JSON: an array of any values.",
}
# Well-known types that Envoy can take from a query parameter or a path segment.
_QUERY_WELL_KNOWN = frozenset(
    name
    for name in _WELL_KNOWN
    if name.endswith("Value") and name not in ("google.protobuf.Value", "google.protobuf.ListValue")
) | {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"}
# AIP-158's page size: 0 means the default, negative is refused.
PAGE_SIZE_FIELD = "page_size"

_ERROR_RESPONSE = "Error"
_INFO_DESCRIPTION = """\
The HTTP/JSON API of the FAR platform, generated from the gRPC contracts in `protos/far/`.

Envoy transcodes each HTTP request to the gRPC method named in the operation's `x-grpc-method` and the \
answer back. Bodies and query parameters use the proto3 JSON mapping: lowerCamelCase field names, 64-bit \
integers as decimal strings, enums as their value names, `google.protobuf.Timestamp` as RFC 3339 strings, \
`google.protobuf.Duration` as seconds with an `s` suffix (`3.5s`), `google.protobuf.FieldMask` as a \
comma-separated string of lowerCamelCase paths. Fields with default values are left out of responses.

Resource names such as `games/{game}/builds/{build}` appear in URLs as one path parameter per segment; \
`x-grpc-path-bindings` says which request field the segments make up. Request fields bound neither to the \
path nor to the body are query parameters, nested fields joined with dots (`filter.state`), repeated ones \
repeated (`genres=a&genres=b`).

Errors are `google.rpc.Status` objects whose `details` carry a `google.rpc.ErrorInfo` (domain \
`<service>.far.network` and an UPPER_SNAKE `reason`) and, where they apply, `google.rpc.BadRequest` or \
`google.rpc.RetryInfo`. The HTTP status follows the gRPC code: INVALID_ARGUMENT and FAILED_PRECONDITION \
400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, ALREADY_EXISTS and ABORTED 409, \
RESOURCE_EXHAUSTED 429, INTERNAL 500, UNAVAILABLE 503.

Server-streaming methods (`x-grpc-streaming: server`) answer with a JSON array of messages, or with \
newline-delimited JSON; their last message says how the stream ended, since a JSON client cannot see an \
error in the middle of a stream. Client-streaming methods (`x-grpc-streaming: client`) take a JSON array.

Authentication: `Authorization: Bearer <JWT>`. Public reads work without it; every operation's \
description says who may call it.
"""


# --------------------------------------------------------------------------------------------------------
# Descriptor index


@dataclass(frozen=True)
class _Message:
    full_name: str
    proto: descriptor_pb2.DescriptorProto
    file: descriptor_pb2.FileDescriptorProto
    path: tuple[int, ...]


@dataclass(frozen=True)
class _Enum:
    full_name: str
    proto: descriptor_pb2.EnumDescriptorProto
    file: descriptor_pb2.FileDescriptorProto
    path: tuple[int, ...]


@dataclass(frozen=True)
class _Service:
    full_name: str
    proto: descriptor_pb2.ServiceDescriptorProto
    file: descriptor_pb2.FileDescriptorProto
    path: tuple[int, ...]


_INTERNAL_COMMENT = re.compile(r"\(--.*?--\)", re.DOTALL)


def _clean_comment(raw: str) -> str:
    """A proto comment as Markdown: protoc's leading space and AIP `(-- internal --)` notes removed."""
    lines = [line[1:] if line.startswith(" ") else line for line in raw.split("\n")]
    text = _INTERNAL_COMMENT.sub("", "\n".join(line.rstrip() for line in lines))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


class _Index:
    def __init__(self, files: Sequence[descriptor_pb2.FileDescriptorProto]) -> None:
        self.files = list(files)
        self.messages: dict[str, _Message] = {}
        self.enums: dict[str, _Enum] = {}
        self.services: list[_Service] = []
        self._comments: dict[tuple[str, tuple[int, ...]], str] = {}
        # google.api.resource type -> patterns, and every pattern in a stable order.
        self.resource_patterns: dict[str, list[str]] = {}
        for file in self.files:
            self._index_file(file)
        self.all_patterns = sorted({p for patterns in self.resource_patterns.values() for p in patterns})

    def _index_file(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        for location in file.source_code_info.location:
            text = location.leading_comments or location.trailing_comments
            if text:
                self._comments[(file.name, tuple(location.path))] = _clean_comment(text)
        prefix = f"{file.package}." if file.package else ""
        for i, message in enumerate(file.message_type):
            self._index_message(file, message, prefix + message.name, (_FILE_MESSAGE, i))
        for i, enum in enumerate(file.enum_type):
            self._index_enum(file, enum, prefix + enum.name, (_FILE_ENUM, i))
        for i, service in enumerate(file.service):
            self.services.append(_Service(prefix + service.name, service, file, (_FILE_SERVICE, i)))
        for resource in file.options.Extensions[resource_pb2.resource_definition]:
            self._add_resource(resource)

    def _index_message(
        self,
        file: descriptor_pb2.FileDescriptorProto,
        message: descriptor_pb2.DescriptorProto,
        full_name: str,
        path: tuple[int, ...],
    ) -> None:
        self.messages[full_name] = _Message(full_name, message, file, path)
        if message.options.HasExtension(resource_pb2.resource):
            self._add_resource(message.options.Extensions[resource_pb2.resource])
        for i, nested in enumerate(message.nested_type):
            self._index_message(file, nested, f"{full_name}.{nested.name}", (*path, _MESSAGE_NESTED, i))
        for i, enum in enumerate(message.enum_type):
            self._index_enum(file, enum, f"{full_name}.{enum.name}", (*path, _MESSAGE_ENUM, i))

    def _index_enum(
        self,
        file: descriptor_pb2.FileDescriptorProto,
        enum: descriptor_pb2.EnumDescriptorProto,
        full_name: str,
        path: tuple[int, ...],
    ) -> None:
        self.enums[full_name] = _Enum(full_name, enum, file, path)

    def _add_resource(self, resource: Any) -> None:
        if resource.type:
            patterns = self.resource_patterns.setdefault(resource.type, [])
            patterns.extend(p for p in resource.pattern if p not in patterns)

    def comment(self, file: descriptor_pb2.FileDescriptorProto, path: tuple[int, ...]) -> str:
        return self._comments.get((file.name, path), "")

    def message(self, type_name: str) -> _Message:
        name = type_name.lstrip(".")
        if name not in self.messages:
            raise ValueError(f"openapi: message {name!r} is not in the descriptor set")
        return self.messages[name]

    def field_comment(self, message: _Message, index: int) -> str:
        return self.comment(message.file, (*message.path, _MESSAGE_FIELD, index))


def _behaviors(field_proto: FieldProto) -> set[int]:
    return set(field_proto.options.Extensions[field_behavior_pb2.field_behavior])


def _is_required(field_proto: FieldProto) -> bool:
    return field_behavior_pb2.REQUIRED in _behaviors(field_proto) or field_proto.label == FieldProto.LABEL_REQUIRED


def _is_output_only(field_proto: FieldProto) -> bool:
    return field_behavior_pb2.OUTPUT_ONLY in _behaviors(field_proto)


def _is_message(field_proto: FieldProto) -> bool:
    return field_proto.type in (FieldProto.TYPE_MESSAGE, FieldProto.TYPE_GROUP)


def _json_name(field_proto: FieldProto) -> str:
    if field_proto.json_name:
        return field_proto.json_name
    head, *rest = field_proto.name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _real_oneof(message: descriptor_pb2.DescriptorProto, field_proto: FieldProto) -> int | None:
    """The index of the (non-synthetic) oneof the field belongs to."""
    if field_proto.HasField("oneof_index") and not field_proto.proto3_optional:
        return field_proto.oneof_index
    return None


def _oneof_members(message: descriptor_pb2.DescriptorProto, oneof: int) -> list[str]:
    return [f"`{_json_name(f)}`" for f in message.field if _real_oneof(message, f) == oneof]


def _first_sentence(text: str) -> str:
    paragraph = " ".join(text.split("\n\n", 1)[0].split())
    for match in re.finditer(r"[.!?](?=\s|$)", paragraph):
        word = paragraph[: match.end()].rsplit(" ", 1)[-1].lower()
        if word in ("e.g.", "i.e.", "etc.", "vs.", "cf."):
            continue
        return paragraph[: match.end()].rstrip(".")
    return paragraph


def _singular(collection: str) -> str:
    """`games` -> `game`, `policies` -> `policy`, `userEvents` -> `user_event`."""
    word = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", collection).lower()
    word = re.sub(r"[^a-z0-9_]", "_", word).strip("_") or "id"
    if word.endswith("ies") and len(word) > 3:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


# --------------------------------------------------------------------------------------------------------
# Path templates (google/api/http.proto)


@dataclass
class _Slot:
    """One wildcard of a path template: a path parameter."""

    multi: bool
    name: str = ""


@dataclass
class _Variable:
    field_path: tuple[str, ...]
    segments: list[str | _Slot]
    fields: list[FieldProto] = field(default_factory=list)

    @property
    def slots(self) -> list[_Slot]:
        return [s for s in self.segments if isinstance(s, _Slot)]

    @property
    def whole_field(self) -> bool:
        """`{field}` or `{field=*}` / `{field=**}`: one parameter is the whole field."""
        return len(self.segments) == 1 and isinstance(self.segments[0], _Slot)

    def template(self, binding: bool = False) -> str:
        """The variable's segments with parameter names; `binding` marks multi-segment ones `{x=**}`."""
        return "/".join(
            s if isinstance(s, str) else "{" + s.name + ("=**" if binding and s.multi else "") + "}"
            for s in self.segments
        )


@dataclass
class _Template:
    segments: list[str | _Slot | _Variable]
    verb: str | None

    @property
    def slots(self) -> list[_Slot]:
        slots: list[_Slot] = []
        for segment in self.segments:
            if isinstance(segment, _Slot):
                slots.append(segment)
            elif isinstance(segment, _Variable):
                slots.extend(segment.slots)
        return slots

    @property
    def variables(self) -> list[_Variable]:
        return [s for s in self.segments if isinstance(s, _Variable)]

    def skeleton(self) -> str:
        """The path with parameters blanked: templates with the same skeleton must name them alike."""
        return re.sub(r"\{[^}]*\}", "{}", self.render())

    def render(self) -> str:
        parts: list[str] = []
        for segment in self.segments:
            if isinstance(segment, str):
                parts.append(segment)
            elif isinstance(segment, _Slot):
                parts.append("{" + segment.name + "}")
            else:
                parts.append(segment.template())
        return "/" + "/".join(parts) + (f":{self.verb}" if self.verb else "")


def _split_top(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    depth = start = 0
    for i, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _parse_template(template: str) -> _Template:
    if not template.startswith("/"):
        raise ValueError(f"openapi: HTTP path template {template!r} does not start with '/'")
    body, verb = template[1:], None
    pieces = _split_top(body, ":")
    if len(pieces) > 2:
        raise ValueError(f"openapi: HTTP path template {template!r} has more than one ':verb'")
    if len(pieces) == 2:
        body, verb = pieces
    segments: list[str | _Slot | _Variable] = []
    for part in _split_top(body, "/"):
        if part.startswith("{"):
            if not part.endswith("}"):
                raise ValueError(f"openapi: bad variable {part!r} in HTTP path template {template!r}")
            field_path, _, pattern = part[1:-1].partition("=")
            sub: list[str | _Slot] = [
                _Slot(multi=s == "**") if s in ("*", "**") else s for s in (pattern or "*").split("/")
            ]
            segments.append(_Variable(tuple(field_path.strip().split(".")), sub))
        elif part in ("*", "**"):
            segments.append(_Slot(multi=part == "**"))
        elif part:
            segments.append(part)
        else:
            raise ValueError(f"openapi: empty segment in HTTP path template {template!r}")
    return _Template(segments, verb)


def _match_pattern(segments: Sequence[str | _Slot], pattern: str) -> list[str] | None:
    """The names of the variables of a resource pattern matching the segments, one per `*`."""
    parts = pattern.split("/")
    if len(parts) != len(segments):
        return None
    names: list[str] = []
    for segment, part in zip(segments, parts, strict=True):
        variable = re.fullmatch(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", part)
        if isinstance(segment, str):
            if segment != part:
                return None
        elif segment.multi or variable is None:
            return None
        else:
            names.append(variable.group(1))
    return names


# --------------------------------------------------------------------------------------------------------
# The generator


@dataclass
class _Binding:
    method: str  # lower-case HTTP method
    path: str
    body: str
    response_body: str


def _bindings(rule: Any) -> list[_Binding]:
    found: list[_Binding] = []
    for current in [rule, *rule.additional_bindings]:
        pattern = current.WhichOneof("pattern")
        if pattern is None:
            continue
        if pattern == "custom":
            method, path = current.custom.kind.lower(), current.custom.path
        else:
            method, path = pattern, getattr(current, pattern)
        if method in OPENAPI_METHODS and path:
            found.append(_Binding(method, path, current.body, current.response_body))
    return found


class _Generator:
    def __init__(self, index: _Index) -> None:
        self.index = index
        self.schemas: dict[str, Json] = {}
        self._queued: set[str] = set()
        self._queue: list[str] = []
        self._skeleton_names: dict[str, list[str]] = {}

    # -- schemas ------------------------------------------------------------------------------------------

    def ref(self, full_name: str) -> Json:
        if full_name not in self._queued:
            self._queued.add(full_name)
            self._queue.append(full_name)
        return {"$ref": f"#/components/schemas/{full_name}"}

    def type_schema(self, type_name: str) -> Json:
        """The schema of a message type: a well-known type inline, else a reference."""
        name = type_name.lstrip(".")
        if name in _WELL_KNOWN:
            return copy.deepcopy(_WELL_KNOWN[name])
        self.index.message(name)
        return self.ref(name)

    def value_schema(self, field_proto: FieldProto) -> Json:
        """The schema of one value of a field (an element when repeated)."""
        if field_proto.type in _SCALARS:
            return dict(_SCALARS[field_proto.type])
        name = field_proto.type_name.lstrip(".")
        if field_proto.type == FieldProto.TYPE_ENUM:
            if name == "google.protobuf.NullValue":
                return {"nullable": True, "description": "Always `null`."}
            if name not in self.index.enums:
                raise ValueError(f"openapi: enum {name!r} is not in the descriptor set")
            return self.ref(name)
        return self.type_schema(name)

    def map_entry(self, field_proto: FieldProto) -> _Message | None:
        if field_proto.label != FieldProto.LABEL_REPEATED or not _is_message(field_proto):
            return None
        entry = self.index.message(field_proto.type_name)
        return entry if entry.proto.options.map_entry else None

    def field_schema(self, field_proto: FieldProto) -> Json:
        """The schema of a field's JSON value, without its description."""
        entry = self.map_entry(field_proto)
        if entry is not None:
            value = next(f for f in entry.proto.field if f.number == 2)
            return {"type": "object", "additionalProperties": self.value_schema(value)}
        if field_proto.label == FieldProto.LABEL_REPEATED:
            return {"type": "array", "items": self.value_schema(field_proto)}
        return self.value_schema(field_proto)

    def field_description(self, message: _Message, index: int) -> str:
        field_proto = message.proto.field[index]
        parts = [self.index.field_comment(message, index)]
        note = _WELL_KNOWN_NOTES.get(field_proto.type_name.lstrip(".")) if _is_message(field_proto) else None
        if note:
            parts.append(note)
        oneof = _real_oneof(message.proto, field_proto)
        if oneof is not None:
            members = _oneof_members(message.proto, oneof)
            parts.append(
                f"Member of the oneof `{message.proto.oneof_decl[oneof].name}`: "
                f"at most one of {', '.join(members)} may be set."
            )
        return "\n\n".join(p for p in parts if p)

    def property_schema(self, message: _Message, index: int) -> Json:
        field_proto = message.proto.field[index]
        schema = self.field_schema(field_proto)
        extra: Json = {}
        description = self.field_description(message, index)
        if description:
            extra["description"] = description
        if _is_output_only(field_proto):
            extra["readOnly"] = True
        if field_proto.options.deprecated:
            extra["deprecated"] = True
        if not extra:
            return schema
        if "$ref" in schema:  # siblings of $ref are ignored in OpenAPI 3.0
            schema = {"allOf": [schema]}
        return {**schema, **extra}

    def message_schema(self, message: _Message, skip: frozenset[str] = frozenset()) -> Json:
        properties: Json = {}
        required: list[str] = []
        for i, field_proto in enumerate(message.proto.field):
            if field_proto.name in skip:
                continue
            json_name = _json_name(field_proto)
            properties[json_name] = self.property_schema(message, i)
            if _is_required(field_proto):
                required.append(json_name)
        schema: Json = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        description = self.message_description(message)
        if description:
            schema["description"] = description
        if message.proto.options.deprecated:
            schema["deprecated"] = True
        return schema

    def message_description(self, message: _Message) -> str:
        parts = [self.index.comment(message.file, message.path)]
        for i, oneof in enumerate(message.proto.oneof_decl):
            members = _oneof_members(message.proto, i)
            if not members:
                continue
            comment = self.index.comment(message.file, (*message.path, _MESSAGE_ONEOF, i))
            line = f"Oneof `{oneof.name}`: at most one of {', '.join(members)}."
            parts.append(f"{line} {comment}" if comment else line)
        return "\n\n".join(p for p in parts if p)

    def enum_schema(self, enum: _Enum) -> Json:
        names = [value.name for value in enum.proto.value]
        lines = []
        for i, value in enumerate(enum.proto.value):
            comment = self.index.comment(enum.file, (*enum.path, _ENUM_VALUE, i))
            text = " ".join(comment.split())
            lines.append(f"- `{value.name}`: {text}" if text else f"- `{value.name}`")
        description = "\n\n".join(p for p in (self.index.comment(enum.file, enum.path), "\n".join(lines)) if p)
        schema: Json = {"type": "string", "enum": names}
        if description:
            schema["description"] = description
        if enum.proto.options.deprecated:
            schema["deprecated"] = True
        return schema

    def drain(self) -> None:
        while self._queue:
            name = self._queue.pop(0)
            if name in self.index.enums:
                self.schemas[name] = self.enum_schema(self.index.enums[name])
            else:
                self.schemas[name] = self.message_schema(self.index.message(name))

    # -- path parameters ----------------------------------------------------------------------------------

    def resolve(self, message: _Message, field_path: Sequence[str]) -> list[FieldProto]:
        """The fields along a dotted request field path."""
        fields: list[FieldProto] = []
        current: _Message | None = message
        for i, name in enumerate(field_path):
            if current is None:
                raise ValueError(f"openapi: {'.'.join(field_path[:i])} in {message.full_name} is not a message")
            found = next((f for f in current.proto.field if f.name == name), None)
            if found is None:
                raise ValueError(f"openapi: {message.full_name} has no field {'.'.join(field_path)!r}")
            fields.append(found)
            is_singular_message = _is_message(found) and found.label != FieldProto.LABEL_REPEATED
            current = self.index.message(found.type_name) if is_singular_message else None
        return fields

    def _variable_names(self, variable: _Variable) -> list[str]:
        json_path = ".".join(_json_name(f) for f in variable.fields)
        slots = variable.slots
        if variable.whole_field:
            return [json_path]
        reference = variable.fields[-1].options.Extensions[resource_pb2.resource_reference]
        preferred = self.index.resource_patterns.get(reference.type, []) if reference.type else []
        for pattern in [*preferred, *self.index.all_patterns]:
            matched = _match_pattern(variable.segments, pattern)
            if matched is not None:
                return matched
        names: list[str] = []
        previous: str | None = None  # a literal before the variable (such as `v1`) names nothing
        for segment in variable.segments:
            if isinstance(segment, str):
                previous = segment
            else:
                names.append(_singular(previous) if previous else json_path.replace(".", "_"))
                previous = None
        if len(slots) == 1 and names[0] == json_path.replace(".", "_"):
            return [json_path]
        return names

    def name_slots(self, template: _Template) -> None:
        taken: set[str] = set()
        before: str | None = None
        for segment in template.segments:
            if isinstance(segment, str):
                before = segment
            elif isinstance(segment, _Slot):
                segment.name = _unique(_singular(before) if before else "path", taken)
                before = None
            else:
                names = self._variable_names(segment)
                for slot, name in zip(segment.slots, names, strict=True):
                    slot.name = _unique(name, taken)
                last = segment.segments[-1]
                before = last if isinstance(last, str) else None
        # The same path with other parameter names is the same path to OpenAPI (and to Envoy): reuse.
        skeleton = template.skeleton()
        slots = template.slots
        if skeleton in self._skeleton_names:
            for slot, name in zip(slots, self._skeleton_names[skeleton], strict=True):
                slot.name = name
        else:
            self._skeleton_names[skeleton] = [slot.name for slot in slots]

    def path_parameters(self, template: _Template, request: _Message) -> list[Json]:
        parameters: list[Json] = []
        for segment in template.segments:
            if isinstance(segment, _Slot):
                parameters.append(
                    {
                        "name": segment.name,
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "A path segment that is matched but not bound to a request field.",
                    }
                )
                continue
            if not isinstance(segment, _Variable):
                continue
            target = segment.fields[-1]
            if _is_message(target) or target.label == FieldProto.LABEL_REPEATED:
                raise ValueError(
                    f"openapi: path variable {'.'.join(segment.field_path)} of {request.full_name} "
                    "must be a singular scalar field"
                )
            json_path = ".".join(_json_name(f) for f in segment.fields)
            owner = self.owner(request, segment.field_path)
            comment = self.index.field_comment(owner, list(owner.proto.field).index(target))
            for slot in segment.slots:
                if segment.whole_field:
                    schema = self.value_schema(target) if not slot.multi else {"type": "string"}
                    parts = [comment]
                else:
                    schema = {"type": "string"}
                    parts = [f"The `{{{slot.name}}}` segment of `{json_path}`, which is `{segment.template(True)}`."]
                    if comment:
                        parts.append(f"`{json_path}`: {comment}")
                parameter: Json = {"name": slot.name, "in": "path", "required": True, "schema": schema}
                if slot.multi:
                    parts.append("Matches one or more path segments: the value may contain `/`, sent unescaped.")
                    parameter["x-grpc-multi-segment"] = True
                description = "\n\n".join(p for p in parts if p)
                if description:
                    parameter["description"] = description
                parameters.append(parameter)
        return parameters

    def owner(self, request: _Message, field_path: Sequence[str]) -> _Message:
        """The message that declares the last field of a path."""
        fields = self.resolve(request, field_path)
        return request if len(fields) == 1 else self.index.message(fields[-2].type_name)

    # -- query parameters and bodies ----------------------------------------------------------------------

    def query_parameters(
        self,
        message: _Message,
        excluded: set[tuple[str, ...]],
        prefix: tuple[str, ...] = (),
        json_prefix: str = "",
        chain: tuple[str, ...] = (),
        required: bool = True,
    ) -> list[Json]:
        parameters: list[Json] = []
        for i, field_proto in enumerate(message.proto.field):
            path = (*prefix, field_proto.name)
            if path in excluded or _is_output_only(field_proto) or self.map_entry(field_proto) is not None:
                continue
            name = json_prefix + _json_name(field_proto)
            repeated = field_proto.label == FieldProto.LABEL_REPEATED
            type_name = field_proto.type_name.lstrip(".")
            if _is_message(field_proto) and type_name not in _QUERY_WELL_KNOWN:
                if repeated or type_name in _WELL_KNOWN or type_name in chain:
                    continue  # not expressible in a query string (or a loop)
                nested = self.index.message(type_name)
                parameters += self.query_parameters(
                    nested,
                    excluded,
                    path,
                    name + ".",
                    (*chain, message.full_name, type_name),
                    required and _is_required(field_proto),
                )
                continue
            schema = self.field_schema(field_proto)
            if field_proto.name == PAGE_SIZE_FIELD and not repeated:
                # AIP-158: a negative page size is INVALID_ARGUMENT, so the document says so up front.
                schema = {**schema, "minimum": 0}
            parameter: Json = {"name": name, "in": "query", "schema": schema}
            if repeated:
                parameter["style"] = "form"
                parameter["explode"] = True
            description = self.field_description(message, i)
            if description:
                parameter["description"] = description
            if required and _is_required(field_proto):
                parameter["required"] = True
            if field_proto.options.deprecated:
                parameter["deprecated"] = True
            parameters.append(parameter)
        return parameters

    def body_schema(self, request: _Message, bound: list[_Variable]) -> Json | None:
        """The schema of a `body: "*"` request: the request message minus the fields bound in the path."""
        whole = {v.field_path[0] for v in bound if len(v.field_path) == 1}
        skipped = set(whole)
        for name in whole:  # a oneof member in the path rules out the others
            field_proto = next(f for f in request.proto.field if f.name == name)
            oneof = _real_oneof(request.proto, field_proto)
            if oneof is not None:
                skipped |= {f.name for f in request.proto.field if _real_oneof(request.proto, f) == oneof}
        nested = [v for v in bound if len(v.field_path) > 1]
        if not skipped and not nested:
            return self.type_schema(request.full_name)
        schema = self.message_schema(request, frozenset(skipped))
        if not schema["properties"]:
            return None
        for variable in nested:
            top = _json_name(variable.fields[0])
            path = ".".join(_json_name(f) for f in variable.fields)
            prop = schema["properties"].get(top)
            if prop is None:
                continue
            if "$ref" in prop:
                prop = schema["properties"][top] = {"allOf": [prop]}
            note = f"`{path}` is taken from the URL path."
            prop["description"] = f"{prop['description']}\n\n{note}" if prop.get("description") else note
        return schema

    # -- operations ---------------------------------------------------------------------------------------

    def operation(
        self,
        service: _Service,
        method_index: int,
        binding: _Binding,
        operation_id: str,
        tag: str,
    ) -> tuple[str, Json]:
        method = service.proto.method[method_index]
        request = self.index.message(method.input_type)
        response = self.index.message(method.output_type)
        template = _parse_template(binding.path)
        for variable in template.variables:
            variable.fields = self.resolve(request, variable.field_path)
        self.name_slots(template)
        path = template.render()

        comment = self.index.comment(service.file, (*service.path, _SERVICE_METHOD, method_index))
        operation: Json = {
            "operationId": operation_id,
            "tags": [tag],
            "x-grpc-method": f"/{service.full_name}/{method.name}",
        }
        if comment:
            operation["summary"] = _first_sentence(comment)
            operation["description"] = comment
        if method.options.deprecated:
            operation["deprecated"] = True
        bindings = {
            ".".join(_json_name(f) for f in v.fields): v.template(binding=True)
            for v in template.variables
            if not v.whole_field
        }
        if bindings:
            operation["x-grpc-path-bindings"] = bindings

        parameters = self.path_parameters(template, request)
        excluded = {v.field_path for v in template.variables}
        if binding.body:
            excluded.add((binding.body,))
        for name in [p[0] for p in excluded if len(p) == 1]:
            found = next((f for f in request.proto.field if f.name == name), None)
            oneof = _real_oneof(request.proto, found) if found is not None else None
            if oneof is not None:
                excluded |= {(f.name,) for f in request.proto.field if _real_oneof(request.proto, f) == oneof}

        body: Json | None = None
        body_required = False
        body_description = ""
        if binding.body == "*":
            body = self.body_schema(request, template.variables)
            body_required = any(_is_required(f) for f in request.proto.field if (f.name,) not in excluded)
        else:
            if binding.body:
                fields = self.resolve(request, [binding.body])
                body = self.field_schema(fields[0])
                body_required = _is_required(fields[0])
                body_description = self.index.field_comment(request, list(request.proto.field).index(fields[0]))
            parameters += self.query_parameters(request, excluded)
        if parameters:
            operation["parameters"] = parameters

        if method.client_streaming:
            operation["x-grpc-streaming"] = "bidi" if method.server_streaming else "client"
            if body is None:
                body = {"type": "object"}
            body = {"type": "array", "items": body}
            body_required = True
            body_description = (
                f"The stream of requests, a JSON array. {body_description}"
                if body_description
                else "The stream of requests, a JSON array."
            )
        elif method.server_streaming:
            operation["x-grpc-streaming"] = "server"
        if body is not None:
            request_body: Json = {"content": {JSON_MEDIA: {"schema": body}}, "required": body_required}
            if body_description:
                request_body["description"] = body_description
            operation["requestBody"] = request_body

        operation["responses"] = {
            "200": self.response(response, binding.response_body, method.server_streaming),
            "default": {"$ref": f"#/components/responses/{_ERROR_RESPONSE}"},
        }
        return path, operation

    def response(self, response: _Message, response_body: str, streaming: bool) -> Json:
        if response_body:
            fields = self.resolve(response, response_body.split("."))
            schema = self.field_schema(fields[-1])
            what = f"The `{'.'.join(_json_name(f) for f in fields)}` field of a `{response.full_name}`"
        else:
            schema = self.type_schema(response.full_name)
            what = f"A `{response.full_name}`"
        if not streaming:
            return {"description": f"{what}.", "content": {JSON_MEDIA: {"schema": schema}}}
        return {
            "description": (
                f"A stream of messages, each one {what[0].lower()}{what[1:]}. As `{JSON_MEDIA}` the "
                "stream is a JSON array of the messages, sent as they come; as "
                f"`{NDJSON_MEDIA}` one message per line. The last message says how the stream ended."
            ),
            "content": {
                JSON_MEDIA: {"schema": {"type": "array", "items": schema}},
                NDJSON_MEDIA: {"schema": schema},
            },
        }


def _error_response(generator: _Generator) -> Json:
    if STATUS in generator.index.messages:
        schema = generator.ref(STATUS)
    else:  # a descriptor set without google/rpc/status.proto: the same shape, written out
        schema = {
            "type": "object",
            "properties": {
                "code": {"type": "integer", "format": "int32", "description": "The gRPC status code."},
                "message": {"type": "string", "description": "A developer-facing error message in English."},
                "details": {"type": "array", "items": copy.deepcopy(_ANY_SCHEMA)},
            },
        }
    for name in ERROR_DETAILS:
        if name in generator.index.messages:
            generator.ref(name)
    return {
        "description": (
            "An error: a `google.rpc.Status` with the gRPC `code`, a `message` and `details` that carry a "
            "`google.rpc.ErrorInfo` (domain and reason) and, where they apply, a `google.rpc.BadRequest` "
            "(one violation per bad field) or a `google.rpc.RetryInfo`. The HTTP status follows the code "
            "(see the API description)."
        ),
        "content": {JSON_MEDIA: {"schema": schema}},
    }


def _is_far(package: str) -> bool:
    return package == FAR_PACKAGE or package.startswith(FAR_PACKAGE + ".")


def build_openapi(descriptor_set: descriptor_pb2.FileDescriptorSet) -> Json:
    """The OpenAPI document (a JSON-ready dict) of every HTTP-bound method of the `far.*` services."""
    index = _Index(descriptor_set.file)
    generator = _Generator(index)
    services = sorted(
        (s for s in index.services if _is_far(s.file.package)),
        key=lambda s: s.full_name,
    )
    routed = [
        (service, i, _bindings(method.options.Extensions[annotations_pb2.http]))
        for service in services
        for i, method in enumerate(service.proto.method)
        if method.options.HasExtension(annotations_pb2.http)
    ]
    routed = [(service, i, bindings) for service, i, bindings in routed if bindings]
    short_names: dict[str, set[str]] = {}
    for service, _, _ in routed:
        short_names.setdefault(service.proto.name, set()).add(service.full_name)

    paths: dict[str, Json] = {}
    tags: dict[str, Json] = {}
    operation_ids: set[str] = set()
    for service, i, bindings in routed:
        unique_short = len(short_names[service.proto.name]) == 1
        tag = service.proto.name if unique_short else service.full_name
        if tag not in tags:
            tags[tag] = {"name": tag}
            comment = index.comment(service.file, service.path)
            if comment:
                tags[tag]["description"] = comment
        base_id = f"{tag.replace('.', '_')}_{service.proto.method[i].name}"
        for n, binding in enumerate(bindings, start=1):
            operation_id = _unique(base_id if n == 1 else f"{base_id}_{n}", operation_ids)
            path, operation = generator.operation(service, i, binding, operation_id, tag)
            item = paths.setdefault(path, {})
            if binding.method in item:
                raise ValueError(
                    f"openapi: {binding.method.upper()} {path} is bound by both "
                    f"{item[binding.method]['x-grpc-method']} and {operation['x-grpc-method']}"
                )
            item[binding.method] = operation

    error_response = _error_response(generator)
    generator.drain()
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": TITLE, "version": API_VERSION, "description": _INFO_DESCRIPTION},
        "servers": [{"url": "/"}],
        "security": [{}, {"bearerAuth": []}],
        "tags": [tags[name] for name in sorted(tags)],
        "paths": paths,
        "components": {
            "schemas": generator.schemas,
            "responses": {_ERROR_RESPONSE: error_response},
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A FAR access token (JWT). Optional for public reads.",
                }
            },
        },
    }


def render_openapi(document: Json) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_openapi(descriptor: Path, out: Path) -> None:
    """Read a FileDescriptorSet (protoc --include_imports --include_source_info) and write the document."""
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(Path(descriptor).read_bytes())
    text = render_openapi(build_openapi(descriptor_set))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.openapi",
        description="Write the OpenAPI 3.0.3 document of the FAR HTTP/JSON API from a descriptor set.",
    )
    parser.add_argument("descriptor", type=Path, help="FileDescriptorSet written by protoc --include_imports")
    parser.add_argument("out", type=Path, help="where to write the OpenAPI JSON document")
    args = parser.parse_args(argv)
    write_openapi(args.descriptor, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
