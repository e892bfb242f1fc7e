"""The GGUF header writer convert and set-rope share: ``gguf.GGUFWriter`` with metadata arrays packed at once.

What it does not do: stream tensors (``edgerope.convert.stream``), decide metadata, or read files back
(``edgerope.gguf.reader``).
"""

from __future__ import annotations

import struct
from typing import Any

import gguf
import numpy as np


class FastArrayWriter(gguf.GGUFWriter):
    """``gguf.GGUFWriter`` with metadata arrays packed in one go instead of item by item.

    Same bytes as the parent (a test checks it); the parent's per-item packing takes about a second per
    100k-token vocab (tokens, scores, types).  Little-endian only, like everything edgerope writes.
    """

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool, sub_type: Any = None) -> bytes:
        VT = gguf.GGUFValueType
        if vtype != VT.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE or isinstance(val, (bytes, str)):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        if not val:
            raise ValueError("Invalid GGUF metadata array. Empty array")
        ltype = sub_type if sub_type is not None else VT.get_type(val[0])
        if sub_type is None:  # one item of each Python type decides, as the parent checks every item
            samples = {type(v): v for v in val}.values()
            if any(VT.get_type(v) is not ltype for v in samples):
                raise ValueError("All items in a GGUF array should be of the same type")
        head = struct.pack("<IQ", ltype, len(val))
        if add_vtype:
            head = struct.pack("<I", vtype) + head
        if ltype == VT.STRING:
            items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
            return head + b"".join(struct.pack("<Q", len(b)) + b for b in items)
        fmt = _SCALAR_FORMATS.get(ltype)
        if fmt is None:  # nested arrays: the parent's way
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        return head + np.asarray(val, dtype=np.dtype(fmt)).tobytes()


_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}
