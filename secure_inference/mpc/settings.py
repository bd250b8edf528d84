"""Public settings of a session besides the program: the DReLU variant (exact or approximate).
Torch-free (the command lines build it before torch loads; see :mod:`.options`).

Every party of a session must use the same settings (they change message sizes and results);
:func:`~.party.check_program` compares them, with the fixed point, before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only where a tensor is computed: the CLIs import this first
    import torch

__all__ = ["DReLUConfig", "EXACT", "drelu_config"]


@dataclass(frozen=True)
class DReLUConfig:
    """Which DReLU to run: exact (``ring_bits=64, drop_bits=0``) or approximate.

    ``ring_bits`` (ℓ) is the width of the ring the comparison runs in and ``drop_bits`` (k) the
    number of low bits each party drops locally before it. Valid inputs are
    :meth:`valid_range`; see :mod:`.protocols.drelu` for the protocol and its error analysis.
    """

    ring_bits: int = 64
    drop_bits: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.ring_bits, int) or not isinstance(self.drop_bits, int):
            raise TypeError("ring_bits and drop_bits must be ints")
        if not 3 <= self.ring_bits <= 64:
            raise ValueError(f"ring_bits must be in [3, 64], got {self.ring_bits}")
        if self.drop_bits < 0 or self.ring_bits + self.drop_bits > 64:
            raise ValueError(f"need 0 <= drop_bits and ring_bits + drop_bits <= 64, got "
                             f"ring_bits={self.ring_bits}, drop_bits={self.drop_bits}")

    @classmethod
    def approximate(cls, max_abs_bits: int, drop_bits: int = 0) -> "DReLUConfig":
        """An approximate DReLU for inputs with |x| < 2^max_abs_bits that ignores ``drop_bits``
        low bits (ring of ℓ = max_abs_bits − drop_bits + 1 bits)."""
        if max_abs_bits <= drop_bits + 1:
            raise ValueError(f"max_abs_bits ({max_abs_bits}) must exceed drop_bits + 1 "
                             f"({drop_bits + 1})")
        return cls(ring_bits=max_abs_bits - drop_bits + 1, drop_bits=drop_bits)

    @property
    def exact(self) -> bool:
        """True for the exact 64-bit DReLU."""
        return self.ring_bits == 64 and self.drop_bits == 0

    def valid_range(self) -> tuple[int, int]:
        """``(lo, hi)``: inputs lo ≤ x < hi (fixed-point integers) are handled as documented."""
        top = 1 << (self.drop_bits + self.ring_bits - 1)
        lo = -top + (1 << self.drop_bits) if self.drop_bits else -top
        return lo, top

    def error_probability(self, x: torch.Tensor) -> torch.Tensor:
        """Probability (over the sharing) that DReLU(x) is reported wrongly, for x in range."""
        import torch
        x = torch.as_tensor(x, dtype=torch.int64)
        if self.drop_bits == 0:
            return torch.zeros(x.shape, dtype=torch.float64)
        span = 1 << self.drop_bits
        inside = (x >= 0) & (x < span)
        return torch.where(inside, (span - 1 - x).to(torch.float64) / span,
                           torch.zeros((), dtype=torch.float64))

    def __str__(self) -> str:
        if self.exact:
            return "exact"
        return f"approx(ring_bits={self.ring_bits}, drop_bits={self.drop_bits})"


EXACT = DReLUConfig()


def drelu_config(drelu_bits: int | None = None, drop_bits: int = 0) -> DReLUConfig | None:
    """None (exact DReLU) or the approximate DReLU comparing ``drelu_bits`` bits after
    dropping ``drop_bits`` low bits (the ``--drelu-bits``/``--drop-bits`` settings)."""
    if drelu_bits is None and not drop_bits:
        return None
    return DReLUConfig(ring_bits=64 - drop_bits if drelu_bits is None else int(drelu_bits),
                       drop_bits=int(drop_bits))
