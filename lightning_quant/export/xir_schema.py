"""A minimal protobuf schema for XIR's ``serial_v2`` graph files (``*.xmodel``), built at runtime.

The messages are written for this project: their field numbers were derived by decoding the protobuf wire
format of real Vitis AI 3.5 files (the quantizer's ``LeNet_int.xmodel`` and the compiler's
``LeNet_compiled.xmodel``), and the field names are ours. Only fields seen in those files are declared; both
files parse with no unknown field (``tests/dpu/test_xir_schema.py`` checks this recursively).

The descriptors are assembled with ``google.protobuf.descriptor_pb2`` in a private pool, so nothing is
compiled at build time and no generated ``*_pb2.py`` file is needed.

Example:
    >>> Graph = message_class("Graph")
    >>> g = Graph(name="net")
    >>> op = g.op_node.add(name="x", type="data")
    >>> op.attr["shape"].int32_vec.value.extend([1, 8, 8, 3])
    >>> Graph.FromString(g.SerializeToString()).op_node[0].attr["shape"].int32_vec.value[:]
    [1, 8, 8, 3]
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

__all__ = ["PACKAGE", "message_class", "unknown_field_paths"]

PACKAGE = "lightning_quant.xir_serial_v2"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "bool": _F.TYPE_BOOL,
    "int32": _F.TYPE_INT32,
    "uint64": _F.TYPE_UINT64,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}

# message -> [(field name, number, type, repeated)]; a type that is not a scalar is a message of this schema,
# ``map:<value type>`` a map from string keys. Numbers are those found in Vitis AI 3.5 xmodel files.
_MESSAGES: dict[str, list[tuple[str, int, str, bool]]] = {
    "Bytes": [("value", 1, "bytes", False)],
    "Int32Vec": [("value", 1, "int32", True)],
    "FloatVec": [("value", 1, "float", True)],
    "StringVec": [("value", 1, "string", True)],
    "MapString2Int32": [("value", 1, "map:int32", False)],
    "MapString2String": [("value", 1, "map:string", False)],
    "MapString2Bytes": [("value", 1, "map:Bytes", False)],
    "AttrValue": [  # all in one oneof, so a value equal to its type's default (False, 0, "") is still written
        ("bool_value", 4, "bool", False),
        ("int32_value", 5, "int32", False),
        ("uint64_value", 8, "uint64", False),
        ("float_value", 9, "float", False),
        ("double_value", 10, "double", False),
        ("string_value", 11, "string", False),
        ("bytes_value", 12, "Bytes", False),
        ("int32_vec", 14, "Int32Vec", False),
        ("float_vec", 18, "FloatVec", False),
        ("string_vec", 20, "StringVec", False),
        ("map_string_int32", 22, "MapString2Int32", False),
        ("map_string_string", 26, "MapString2String", False),
        ("map_string_bytes", 27, "MapString2Bytes", False),
    ],
    "OpArg": [("name", 1, "string", False), ("ops", 2, "string", True)],
    "Tensor": [
        ("name", 1, "string", False),
        ("dim", 2, "int32", True),
        ("data_type", 5, "int32", False),
        ("bit_width", 6, "int32", False),
        ("attr", 10, "map:AttrValue", False),
    ],
    "OpNode": [
        ("name", 1, "string", False),
        ("type", 2, "string", False),
        ("attr", 3, "map:AttrValue", False),
        ("args", 4, "OpArg", True),
        ("output_tensor", 5, "Tensor", False),
    ],
    "SubGraph": [
        ("name", 1, "string", False),
        ("op_name", 3, "string", True),
        ("attr", 5, "map:AttrValue", False),
        ("children", 10, "SubGraph", True),
    ],
    "OpArgDef": [
        ("name", 1, "string", False),
        ("occur_type", 2, "int32", False),
        ("data_type", 3, "int32", False),
        ("annotation", 4, "string", False),
    ],
    "AttrDef": [
        ("name", 1, "string", False),
        ("occur_type", 3, "int32", False),
        ("default_value", 4, "AttrValue", False),
        ("list_length", 6, "int32", False),
        ("annotation", 7, "string", False),
    ],
    "OpDef": [
        ("name", 1, "string", False),
        ("input_args", 2, "OpArgDef", True),
        ("attrs", 3, "AttrDef", True),
        ("annotation", 4, "string", False),
    ],
    "Graph": [
        ("name", 1, "string", False),
        ("op_node", 5, "OpNode", True),
        ("subg_root", 10, "SubGraph", False),
        ("attr", 11, "map:AttrValue", False),
        ("op_defs", 101, "OpDef", True),
    ],
}


def _entry_name(field_name: str) -> str:
    return "".join(part.capitalize() for part in field_name.split("_")) + "Entry"


def _add_field(msg: descriptor_pb2.DescriptorProto, name: str, number: int, kind: str, repeated: bool) -> None:
    field = msg.field.add(name=name, number=number)
    if kind.startswith("map:"):
        entry = msg.nested_type.add(name=_entry_name(name))
        entry.options.map_entry = True
        _add_field(entry, "key", 1, "string", False)
        _add_field(entry, "value", 2, kind[4:], False)
        field.label = _F.LABEL_REPEATED
        field.type = _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{msg.name}.{entry.name}"
        return
    field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    else:
        field.type = _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{kind}"


@functools.cache
def _pool() -> descriptor_pool.DescriptorPool:
    proto = descriptor_pb2.FileDescriptorProto(name="lightning_quant_xir_serial_v2.proto", package=PACKAGE)
    proto.syntax = "proto3"
    for msg_name, fields in _MESSAGES.items():
        msg = proto.message_type.add(name=msg_name)
        for name, number, kind, repeated in fields:
            _add_field(msg, name, number, kind, repeated)
        if msg_name == "AttrValue":
            msg.oneof_decl.add(name="value")
            for field in msg.field:
                field.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool


@functools.cache
def message_class(name: str) -> type[Message]:
    """The generated message class ``name`` (``Graph``, ``OpNode``, ``Tensor``, ``AttrValue``, ...).

    Example:
        >>> message_class("AttrValue")(int32_value=3).int32_value
        3

    Raises:
        KeyError: ``name`` is not a message of this schema; the message lists the ones that are.
    """
    if name not in _MESSAGES:
        raise KeyError(f"{name!r} is not an XIR message of this schema; use one of {', '.join(_MESSAGES)}.")
    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"{PACKAGE}.{name}"))


def unknown_field_paths(message: Message, path: str = "") -> list[str]:
    """Paths of every sub-message holding fields this schema does not declare (empty when fully understood).

    Example:
        >>> unknown_field_paths(message_class("Graph")(name="g"))
        []
    """
    found = [path or "<root>"] if _has_unknown(message) else []
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        items: Any = value.values() if _is_map(field) else (value if _is_repeated(field) else [value])
        for i, item in enumerate(items):
            if isinstance(item, Message):
                found.extend(unknown_field_paths(item, f"{path}.{field.name}[{i}]"))
    return found


def _is_map(field: Any) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_repeated(field: Any) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.29
        return bool(field.is_repeated)
    return field.label == _F.LABEL_REPEATED  # pragma: no cover


def _has_unknown(message: Message) -> bool:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet  # protobuf >= 4.22
    except ImportError:  # pragma: no cover
        return len(message.UnknownFields()) > 0
    return len(UnknownFieldSet(message)) > 0
