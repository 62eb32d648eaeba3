"""The one dtype table: each dtype's names in torch, numpy, Triton and TensorRT, and its bytes.

`dtype(x)` accepts a name ("bfloat16"), a short name ("bf16"), a torch dtype or a TensorRT
`DataType` (or its name, "BF16"). Torch-free: `DType.torch` imports torch when read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .errors import OptionError


@dataclass(frozen=True)
class DType:
    """name: torch's (and TensorRT-LLM config.json's) name; short: the CLI / benchmark label;
    bytes: per element; numpy / triton / trt: the name there (None where it has none)."""

    name: str
    short: str
    bytes: float
    numpy: str | None
    triton: str | None
    trt: str | None

    @property
    def torch(self):
        import torch

        return getattr(torch, self.name)


DTYPES: Mapping[str, DType] = MappingProxyType({d.name: d for d in (
    DType("float32", "fp32", 4.0, "float32", "TYPE_FP32", "FLOAT"),
    DType("float16", "fp16", 2.0, "float16", "TYPE_FP16", "HALF"),
    DType("bfloat16", "bf16", 2.0, None, "TYPE_BF16", "BF16"),  # numpy has no bfloat16
    DType("float8_e4m3fn", "fp8", 1.0, None, None, "FP8"),
    DType("int8", "int8", 1.0, "int8", "TYPE_INT8", "INT8"),
    DType("int32", "int32", 4.0, "int32", "TYPE_INT32", "INT32"),
    DType("int64", "int64", 8.0, "int64", "TYPE_INT64", "INT64"),
    DType("bool", "bool", 1.0, "bool", "TYPE_BOOL", "BOOL"),
)})
DTYPE_CHOICES: tuple[str, ...] = tuple(DTYPES)
_BY_ALIAS = {alias: d for d in DTYPES.values() for alias in (d.name, d.short, d.trt) if alias}


def dtype(x) -> DType:
    """The DType of a name, short name, torch dtype or TensorRT DataType; OptionError otherwise."""
    if isinstance(x, DType):
        return x
    name = x if isinstance(x, str) else getattr(x, "name", None)  # a TensorRT DataType's name: "BF16"
    key = name if isinstance(name, str) else str(x).removeprefix("torch.")  # a torch dtype: "torch.bfloat16"
    if key not in _BY_ALIAS:
        raise OptionError(f"expected a dtype in {sorted(DTYPES)} (or {sorted(d.short for d in DTYPES.values())}), "
                          f"got {x!r}")
    return _BY_ALIAS[key]


def torch_dtypes(*names: str) -> dict:
    """{name: torch dtype} for `names` (all of DTYPES when none), for tables keyed by a format's names."""
    return {n: dtype(n).torch for n in (names or DTYPES)}
