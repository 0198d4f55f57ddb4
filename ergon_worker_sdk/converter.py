"""Values <-> payloads. JSON by default (dataclasses, primitives, lists, sets, dicts); pluggable.

Decoding takes a type hint, so a dataclass recorded as a JSON object comes back as that
dataclass on replay. The SDK always hands the flow the *decoded* value, on the first run as on
replay, so both see exactly the same thing.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import pickle
import types
import typing
import weakref
from typing import Any, Protocol

from google.protobuf import json_format

from ergon_worker_sdk.errors import ConverterError
from ergon_worker_sdk.proto.ergon.v1 import common_pb2

JSON = "json/plain"
BINARY = "binary/plain"
NULL = "binary/null"
PICKLE = "python/pickle"


class PayloadConverter(Protocol):
    """Turns values into payloads and back."""

    def to_payload(self, value: Any) -> common_pb2.Payload:
        """Encode a value."""
        ...

    def from_payload(self, payload: common_pb2.Payload, hint: Any = None) -> Any:
        """Decode a payload, shaped by a type hint when given."""
        ...


def to_jsonable(value: Any) -> Any:
    """A JSON-ready form of a value: dataclasses become dicts, tuples lists, enums values."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        # A list in a stable order (set order of strings changes between processes, and the
        # args hash of a step must not).
        items = [to_jsonable(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConverterError(f"JSON object keys must be strings, got {key!r}")
            out[key] = to_jsonable(item)
        return out
    raise ConverterError(
        f"cannot encode {type(value).__name__} as JSON; use dataclasses, primitives, "
        "lists and dicts, or a custom converter"
    )


def from_jsonable(value: Any, hint: Any) -> Any:
    """Shape a decoded JSON value by a type hint (dataclasses, containers, optionals)."""
    if hint is None or hint is Any or value is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return from_jsonable(value, options[0]) if len(options) == 1 else value
    if origin in (list, set, frozenset) and isinstance(value, list):
        (item,) = typing.get_args(hint) or (Any,)
        return origin(from_jsonable(v, item) for v in value)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(v, args[0]) for v in value)
        return tuple(from_jsonable(v, a) for v, a in zip(value, args, strict=False))
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(hint) or (str, Any)
        return {k: from_jsonable(v, item) for k, v in value.items()}
    if isinstance(hint, type):
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            return construct_dataclass(hint, value)
        if issubclass(hint, enum.Enum):
            return hint(value)
        if hint is tuple and isinstance(value, list):
            return tuple(value)
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, float) and value.is_integer():
            # Inline JSON (google.protobuf.Value) carries every number as a double.
            return int(value)
    return value


# A class's resolved field hints. Resolving string annotations compiles each of them: once
# per class, not once per flow. Weak, so classes made on the fly can go.
_INIT_HINTS: weakref.WeakKeyDictionary[type[Any], tuple[dict[str, Any], frozenset[str]]] = (
    weakref.WeakKeyDictionary()
)


def _init_hints(cls: type[Any]) -> tuple[dict[str, Any], frozenset[str]]:
    cached = _INIT_HINTS.get(cls)
    if cached is None:
        known = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
        cached = _INIT_HINTS[cls] = (typing.get_type_hints(cls), known)
    return cached


def construct_dataclass(cls: type[Any], fields: dict[str, Any]) -> Any:
    """Build a dataclass from decoded JSON fields, shaping each by its annotation."""
    hints, known = _init_hints(cls)
    unknown = set(fields) - known
    if unknown:
        raise ConverterError(f"{cls.__name__} has no fields {', '.join(sorted(unknown))}")
    try:
        return cls(**{name: from_jsonable(v, hints.get(name)) for name, v in fields.items()})
    except TypeError as error:
        raise ConverterError(f"cannot build {cls.__name__}: {error}") from error


class JsonConverter:
    """The default converter: compact JSON in `data`, encoding "json/plain"."""

    def to_payload(self, value: Any) -> common_pb2.Payload:
        """Encode a value as JSON (None as binary/null, bytes as binary/plain)."""
        if value is None:
            return common_pb2.Payload(encoding=NULL)
        if isinstance(value, bytes):
            return common_pb2.Payload(encoding=BINARY, data=value)
        try:
            data = json.dumps(to_jsonable(value), separators=(",", ":"), allow_nan=False)
        except ValueError as error:
            raise ConverterError(f"cannot encode value as JSON: {error}") from error
        return common_pb2.Payload(encoding=JSON, data=data.encode())

    def from_payload(self, payload: common_pb2.Payload, hint: Any = None) -> Any:
        """Decode any payload the server may hold; raises ConverterError on bad bytes."""
        body = payload.WhichOneof("body")
        encoding = payload.encoding or JSON
        if body == "json":
            return from_jsonable(json_format.MessageToDict(payload.json), hint)
        if encoding == NULL or (body is None and encoding == JSON):
            return None
        if encoding == BINARY:
            return payload.data
        if encoding == JSON:
            try:
                return from_jsonable(json.loads(payload.data), hint)
            except ValueError as error:
                raise ConverterError(f"payload is not valid JSON: {error}") from error
        if encoding == PICKLE:
            raise ConverterError("payload is pickled; decoding it needs PickleConverter")
        raise ConverterError(f"unknown payload encoding {encoding!r}")


class PickleConverter(JsonConverter):
    """Pickle for values JSON cannot carry. An explicit opt-in: only for trusted peers."""

    def to_payload(self, value: Any) -> common_pb2.Payload:
        """Encode a value with pickle."""
        return common_pb2.Payload(encoding=PICKLE, data=pickle.dumps(value))

    def from_payload(self, payload: common_pb2.Payload, hint: Any = None) -> Any:
        """Decode pickled payloads, and everything the JSON converter decodes."""
        if payload.encoding == PICKLE:
            return pickle.loads(payload.data)
        return super().from_payload(payload, hint)
