"""The one table of tensor element types: KServe v2 datatype names, numpy dtypes, ONNX type strings.

Every conversion goes through :data:`DTYPES`; an unknown name raises
:class:`~.errors.ContractError` instead of returning ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specserve.runtime.errors import ContractError


@dataclass(frozen=True)
class DType:
    kserve: str  # KServe v2 / Triton datatype, e.g. "FP32"
    numpy: np.dtype
    onnx: str  # onnxruntime type string, e.g. "tensor(float)"
    name: str  # short name used in contracts, e.g. "float32"


DTYPES: tuple[DType, ...] = (
    DType("BOOL", np.dtype(np.bool_), "tensor(bool)", "bool"),
    DType("UINT8", np.dtype(np.uint8), "tensor(uint8)", "uint8"),
    DType("INT8", np.dtype(np.int8), "tensor(int8)", "int8"),
    DType("INT16", np.dtype(np.int16), "tensor(int16)", "int16"),
    DType("INT32", np.dtype(np.int32), "tensor(int32)", "int32"),
    DType("INT64", np.dtype(np.int64), "tensor(int64)", "int64"),
    DType("FP16", np.dtype(np.float16), "tensor(float16)", "float16"),
    DType("FP32", np.dtype(np.float32), "tensor(float)", "float32"),
    DType("FP64", np.dtype(np.float64), "tensor(double)", "float64"),
)

_BY_KSERVE = {d.kserve: d for d in DTYPES}
_BY_ONNX = {d.onnx: d for d in DTYPES}
_BY_NAME = {d.name: d for d in DTYPES}
_BY_NUMPY = {d.numpy: d for d in DTYPES}


def _lookup(table: dict, key, kind: str) -> DType:
    try:
        return table[key]
    except (KeyError, TypeError):
        known = ", ".join(sorted(str(k) for k in table))
        raise ContractError(f"unsupported {kind} datatype {key!r} (supported: {known})") from None


def from_kserve(name: str) -> DType:
    return _lookup(_BY_KSERVE, name, "KServe")


def from_onnx(type_string: str) -> DType:
    return _lookup(_BY_ONNX, type_string, "ONNX")


def from_name(name: str) -> DType:
    return _lookup(_BY_NAME, name, "contract")


def from_numpy(dtype) -> DType:
    return _lookup(_BY_NUMPY, np.dtype(dtype), "numpy")
