"""Building an XIR ``serial_v2`` graph message op by op: names, attributes, constants and ``fix`` ops.

Conventions mirror the quantizer output of Vitis AI (``*_int.xmodel``): every op's output tensor is float32
(``data_type`` 4, ``bit_width`` 32) in NHWC layout, constants are ``const`` ops holding float32 bytes that are
already on their ``2**-fix_point`` grid, each followed by a ``fix`` op, and every op is listed in the root
subgraph.

Example:
    >>> import numpy as np
    >>> b = XIRBuilder("Net")
    >>> w = b.fix(b.const("fc.weight", np.zeros((2, 3), np.float32)), fix_point=8)
    >>> w, [op.type for op in b.graph.op_node]
    ('Net__fc_weight_fix', ['const', 'fix'])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_quant.config import RoundingMode
from lightning_quant.export.xir_schema import message_class

__all__ = ["ROUND_MODES", "XIRBuilder", "sanitize", "set_attr"]

ROUND_MODES = {
    RoundingMode.HALF_UP: "DPU_ROUND",
    RoundingMode.HALF_AWAY: "STD_ROUND",
    RoundingMode.HALF_EVEN: "PY3_ROUND",
}
_FLOAT32 = 4  # XIR's data type code of float32 tensors, as found in Vitis AI xmodels


def sanitize(name: str) -> str:
    """An XIR-safe op name: every character outside ``[A-Za-z0-9_]`` becomes ``_``.

    Example:
        >>> sanitize("layer1.0/conv-a")
        'layer1_0_conv_a'
    """
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def set_attr(value: Any, python_value: Any) -> None:
    """Store a Python value in an ``AttrValue`` message (bool, int, float, str, bytes, list of int or float).

    Raises:
        TypeError: a value type XIR attributes do not hold here.
    """
    if isinstance(python_value, bool):
        value.bool_value = python_value
    elif isinstance(python_value, int):
        value.int32_value = python_value
    elif isinstance(python_value, float):
        value.float_value = python_value
    elif isinstance(python_value, str):
        value.string_value = python_value
    elif isinstance(python_value, bytes):
        value.bytes_value.value = python_value
    elif isinstance(python_value, (list, tuple)) and all(isinstance(v, int) for v in python_value):
        value.int32_vec.value.extend(python_value)
    elif isinstance(python_value, (list, tuple)):
        value.float_vec.value.extend(float(v) for v in python_value)
    else:
        raise TypeError(f"cannot store {type(python_value).__name__} in an XIR attribute; use bool/int/float/str.")


class XIRBuilder:
    """Accumulates ops into a ``Graph`` message; op names are ``<graph>__<sanitized name>``, made unique.

    Args:
        graph_name: the graph's name (the model's class name by convention).
    """

    def __init__(self, graph_name: str) -> None:
        self.prefix = sanitize(graph_name)
        self.graph = message_class("Graph")(name=self.prefix)
        self.graph.subg_root.name = "root"
        self.shapes: dict[str, list[int]] = {}

    def unique(self, name: str) -> str:
        base = name if name.startswith(f"{self.prefix}__") else f"{self.prefix}__{sanitize(name)}"
        candidate, i = base, 1
        while candidate in self.shapes:
            candidate, i = f"{base}_{i}", i + 1
        return candidate

    def add(
        self,
        name: str,
        op_type: str,
        shape: Sequence[int],
        attrs: dict[str, Any] | None = None,
        args: Sequence[tuple[str, Sequence[str]]] = (),
    ) -> str:
        """Append one op; returns its (unique) name, which is also its output tensor's name."""
        name = self.unique(name)
        op = self.graph.op_node.add(name=name, type=op_type)
        for key, val in (attrs or {}).items():
            set_attr(op.attr[key], val)
        for arg_name, ops in args:
            op.args.add(name=arg_name, ops=list(ops))
        tensor = op.output_tensor
        tensor.name = name
        tensor.dim.extend(int(d) for d in shape)
        tensor.data_type = _FLOAT32
        tensor.bit_width = 32
        self.graph.subg_root.op_name.append(name)
        self.shapes[name] = [int(d) for d in shape]
        return name

    def const(self, name: str, values: np.ndarray) -> str:
        """A float32 ``const`` op holding ``values`` (C order, little-endian bytes)."""
        data = np.ascontiguousarray(values, dtype="<f4")
        attrs = {"shape": list(data.shape), "data": data.tobytes(), "data_type": "float32"}
        return self.add(name, "const", data.shape, attrs)

    def fix(
        self, source: str, fix_point: int, rounding: RoundingMode = RoundingMode.HALF_UP, bit_width: int = 8
    ) -> str:
        """A signed ``fix`` op after ``source``, named ``<source>_fix``."""
        attrs = {"bit_width": bit_width, "fix_point": int(fix_point), "if_signed": True}
        attrs["round_mode"] = ROUND_MODES[rounding]
        return self.add(f"{source}_fix", "fix", self.shapes[source], attrs, [("input", [source])])
