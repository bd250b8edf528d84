"""The settings of one party's session, as one frozen value (torch-free).

:class:`SessionOptions` is built once, by the party command lines' settings merge
(:func:`~.session_config.session_options`) or by :func:`~.local.run_local`, and handed to
the party (:func:`~.lifecycle.open_party`): fixed point, DReLU, randomness cipher, timeout,
frame limit, device and what the server and the helper accept from a client
(:class:`SessionLimits`). The defaults every layer uses are defined here, once; this module
imports nothing heavy, so the command lines can show them in ``--help`` before torch loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .settings import DReLUConfig

__all__ = ["SessionOptions", "SessionLimits", "CIPHERS", "DEFAULT_CIPHER", "DEFAULT_FRAC_BITS",
           "PREPROCESS_MODES", "DEFAULT_PREPROCESS",
           "DEFAULT_TIMEOUT", "RUN_TIMEOUT", "DEFAULT_MAX_FRAME", "DEFAULT_DEVICE", "MAX_BATCHES",
           "MAX_BATCH", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_IMAGES"]

CIPHERS = ("aes", "chacha20")   # randomness ciphers (:mod:`.prg`); the position is the header code
DEFAULT_CIPHER = "aes"
PREPROCESS_MODES = ("ahead", "interleaved")   # the position is the header code
DEFAULT_PREPROCESS = "interleaved"
"""When the input-independent half of the server-weight layers runs: ``interleaved`` (the
default: each layer's half runs when the layer does, the client's and the helper's mask
products while the server computes its own product, on cores that would otherwise wait; 7–14%
less time per image for ResNet18 on the 2-core machine, benchmark/secure_inference/README.md)
or ``ahead`` (a phase of its own before each batch's images enter, so that the online phase is
only the input-dependent work, and the report gives the two apart). The same messages, masks,
bytes and rounds either way, sent at other times."""
DEFAULT_FRAC_BITS = 16          # fixed-point fractional bits (see :mod:`.ring` for why 16)
DEFAULT_TIMEOUT = 60.0          # seconds a party waits for a frame
RUN_TIMEOUT = 120.0             # the same, in a whole run: the party CLIs and run_local
DEFAULT_MAX_FRAME = 1 << 30     # largest frame a party sends or accepts (1 GiB)
DEFAULT_DEVICE = "cpu"
MAX_BATCHES = 1 << 20           # hard ceilings, whatever the limits say
MAX_BATCH = 1 << 16
DEFAULT_MAX_BATCH = 64          # images per batch the server and helper accept by default
DEFAULT_MAX_IMAGES = 100_000    # images per session the server and helper accept by default


@dataclass(frozen=True)
class SessionLimits:
    """What the server and the helper accept from the client's announcement, checked before
    anything is allocated for it.

    ``max_batch`` bounds the images of one batch: every party's preprocessing and activations
    are sized by it, so it bounds their memory. ``max_images`` bounds the images of a whole
    session (the work a client can ask for). CLI flags: ``--max-batch``/``--max-images`` of
    server.py and crypto_provider.py.
    """

    max_batch: int = DEFAULT_MAX_BATCH
    max_images: int = DEFAULT_MAX_IMAGES

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be in [1, {MAX_BATCH}], got {self.max_batch}")
        if not 1 <= self.max_images <= MAX_BATCHES * MAX_BATCH:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")

    @classmethod
    def admitting(cls, batch_sizes: Sequence[int]) -> "SessionLimits":
        """The default limits, raised as far as needed for these batches (for local runs, where
        the caller is the client itself)."""
        sizes = [int(b) for b in batch_sizes]
        return cls(max_batch=min(MAX_BATCH, max([DEFAULT_MAX_BATCH, *sizes])),
                   max_images=max(DEFAULT_MAX_IMAGES, sum(sizes)))


@dataclass(frozen=True)
class SessionOptions:
    """One party's session settings besides the program. All three parties must agree on
    ``frac_bits``, ``drelu`` and ``prg`` (the header compares them); ``device``, ``timeout``,
    ``max_frame`` and ``limits`` are this party's own.

    ``drelu``: the session's DReLU (None: exact). ``limits``: what the server and the helper
    accept from the client's announcement (the client's are not used). ``session_id``: a
    service session's identifier (empty for a one-shot session), bound into every pair key.
    ``preprocess``: :data:`PREPROCESS_MODES` (all three must agree; the header compares it).
    """

    frac_bits: int = DEFAULT_FRAC_BITS
    drelu: DReLUConfig | None = None
    prg: str = DEFAULT_CIPHER
    timeout: float = DEFAULT_TIMEOUT
    max_frame: int = DEFAULT_MAX_FRAME
    device: str = DEFAULT_DEVICE
    limits: SessionLimits = field(default_factory=SessionLimits)
    session_id: bytes = field(default=b"", repr=False)   # secret until its session ends
    preprocess: str = DEFAULT_PREPROCESS

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, got "
                             f"{self.preprocess!r}")
