"""Frozen configuration objects: what a layer is quantized to, and with which options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .errors import SpecError

#: Bit widths and group sizes MLX can store, per quantization mode.
MODE_LIMITS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "affine": ((1, 2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "nvfp4": ((4,), (16,)),
    "mxfp8": ((8,), (32,)),
}


def _check_mode(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in MODE_LIMITS:
        raise SpecError(f"mode {value!r} is not supported; use one of {sorted(MODE_LIMITS)}")


@attrs.frozen
class QuantSpec:
    """How one weight matrix is stored: ``bits`` per value, one scale per ``group_size``
    consecutive input columns, MLX quantization ``mode``."""

    bits: int = 4
    group_size: int = 64
    mode: str = attrs.field(default="affine", validator=_check_mode)

    def __attrs_post_init__(self) -> None:
        bits_ok, groups_ok = MODE_LIMITS[self.mode]
        if self.bits not in bits_ok:
            raise SpecError(
                f"bits={self.bits} is not supported in mode {self.mode!r}; use one of {list(bits_ok)}"
            )
        if self.group_size not in groups_ok:
            raise SpecError(
                f"group_size={self.group_size} is not supported in mode {self.mode!r}; "
                f"use one of {list(groups_ok)}"
            )

    @property
    def n_levels(self) -> int:
        return (1 << self.bits) - 1

    def allowed_group_sizes(self) -> tuple[int, ...]:
        return MODE_LIMITS[self.mode][1]

    def fitted_to(self, width: int) -> QuantSpec | None:
        """This spec if ``group_size`` divides ``width``; else the largest smaller allowed group
        size that does; ``None`` when no allowed group size divides it."""
        if width % self.group_size == 0:
            return self
        for g in sorted(self.allowed_group_sizes(), reverse=True):
            if g < self.group_size and width % g == 0:
                return attrs.evolve(self, group_size=g)
        return None

    def to_config(self) -> dict[str, Any]:
        """The dict mlx-lm reads from ``config["quantization"][path]`` (mode always written)."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        """Storage cost per weight including the per-group scale (and bias for affine)."""
        if self.mode == "affine":
            return self.bits + 2 * scale_bits / self.group_size
        return self.bits + 8 / self.group_size

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> QuantSpec:
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]), mode=d.get("mode", "affine"))
