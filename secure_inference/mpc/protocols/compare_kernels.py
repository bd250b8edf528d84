"""CPU kernels (numba) of the DReLU's hot loops: PrivateCompare messages, the Z_67 wire format,
the helper's decision and its dealt bit corrections.

The torch versions in :mod:`.drelu` make ~15 passes over an [n, ℓ] int16 array per message
(one per operation, two of them integer remainders); these kernels make one pass per row and
write the packed words directly, which is what makes the DReLU cheap in CPU time. They compute
exactly what the torch versions compute (tested against them): same message layout
(row-major, rotated rows), same packing (five values mod 67 per little-endian int32 word,
``Σ v_i·67^i``), same checks on received words (error codes, turned into
:class:`~secure_inference.mpc.runtime.ProtocolError` by the callers).
"""
from __future__ import annotations

import numba
import numpy as np

P = 67
GROUP = 5
WORD_LIMIT = P ** GROUP
_POW = np.array([P ** i for i in range(GROUP)], dtype=np.int64)

OK, WORD_OUT_OF_RANGE, NONZERO_PADDING = 0, 1, 2


def reduce_words(words: np.ndarray, high: int, out: np.ndarray) -> int:
    """``out[i] = words[i] mod high`` (uint16 → int16, 2 ≤ high ≤ 256); returns how many
    words lie at or above the largest multiple of ``high`` below 2^16 (the caller redraws
    those)."""
    if not 2 <= high <= 256:
        raise ValueError(f"high must be in [2, 256], got {high}")
    # ⌊w/h⌋ = ⌊w·M / 2^40⌋ with M = ⌊2^40/h⌋ + 1 for every w < 2^16: the error w·(M·h − 2^40)
    # is below 2^24 < 2^40/h, so it never reaches the next multiple
    magic = (1 << 40) // high + 1
    return _reduce_words(words, np.uint64(high), np.uint64(magic),
                         np.uint64((65536 // high) * high), out)


@numba.njit(cache=True)
def _reduce_words(words: np.ndarray, high: np.uint64, magic: np.uint64, limit: np.uint64,
                  out: np.ndarray) -> int:
    bad = 0
    for i in range(words.size):
        w = np.uint64(words[i])
        q = (w * magic) >> np.uint64(40)
        out[i] = w - q * high
        if w >= limit:
            bad += 1
    return bad


@numba.njit(cache=True)
def pc_message_packed(j: int, xbits: np.ndarray, r: np.ndarray, beta: np.ndarray,
                      s: np.ndarray, u: np.ndarray, shift: np.ndarray, bits: int,
                      words: np.ndarray) -> None:
    """Party ``j``'s PrivateCompare message for rows of (bit shares ``xbits`` [n, bits] mod 67,
    public ``r`` [n], bits ``beta`` [n], masks ``s``, ``u`` [n, bits], rotations ``shift`` [n])
    packed into ``words`` (int32, ⌈n·bits/5⌉, zeroed). Same values as
    :func:`.drelu.private_compare_message` followed by :func:`.drelu.pack_zp`."""
    n = r.shape[0]
    top = np.int64(-1) if bits == 64 else (np.int64(1) << bits) - 1
    offset = np.int64(P * 200)        # keeps every intermediate positive: |c| < 65·67 + 67
    d = np.empty(bits, dtype=np.uint64)
    packer = np.zeros(3, dtype=np.int64)
    for row in range(n):
        flip = beta[row] != 0
        q = (r[row] + 1) & top if flip else r[row]
        special = flip and r[row] == top
        sigma = -1 if flip else 1
        prefix = np.int64(0)
        for i in range(bits):                       # i = 0 is the most significant bit
            qb = (q >> (bits - 1 - i)) & 1
            x = np.int64(xbits[row, i])
            c = sigma * (j * qb - x) + j + prefix   # σ(j·q_i − x_i) + j + Σ_{k<i} w_k
            prefix += x * (1 - 2 * qb) + j * qb      # shares of x_i ⊕ q_i
            if special:
                c = 0 if i == 0 else j
            cu = np.uint64(c + offset) % np.uint64(P)
            mask = np.uint64(u[row, i]) if j == 0 else np.uint64(P - u[row, i])
            d[i] = (cu * np.uint64(s[row, i]) + mask) % np.uint64(P)
        off = shift[row]
        for k in range(bits):                        # cyclic rotation by the row's offset
            idx = k + off
            if idx >= bits:
                idx -= bits
            _push(words, packer, np.int64(d[idx]))
    _flush(words, packer)


@numba.njit(cache=True)
def _push(words: np.ndarray, packer: np.ndarray, value: int) -> None:
    """Append one value in [0, 67) to the packed stream; ``packer`` = [word being filled
    (Σ v_i 67^i), values in it, index of that word], zeros at the start."""
    packer[0] += value * _POW[packer[1]]
    packer[1] += 1
    if packer[1] == GROUP:
        words[packer[2]] = packer[0]
        packer[0] = 0
        packer[1] = 0
        packer[2] += 1


@numba.njit(cache=True)
def _flush(words: np.ndarray, packer: np.ndarray) -> None:
    """Write the last, partly filled word (its missing values are the zero padding)."""
    if packer[1]:
        words[packer[2]] = packer[0]


@numba.njit(cache=True)
def _digit(words: np.ndarray, flat: int) -> int:
    return (np.int64(words[flat // GROUP]) // _POW[flat % GROUP]) % P


@numba.njit(cache=True)
def check_words(words: np.ndarray, count: int) -> int:
    """OK, WORD_OUT_OF_RANGE or NONZERO_PADDING for ``count`` values packed in ``words``."""
    for w in range(words.size):
        if words[w] < 0 or words[w] >= WORD_LIMIT:
            return WORD_OUT_OF_RANGE
    for flat in range(count, words.size * GROUP):
        if _digit(words, flat) != 0:
            return NONZERO_PADDING
    return OK


@numba.njit(cache=True)
def unpack_words(words: np.ndarray, out: np.ndarray) -> None:
    """The values packed in ``words`` (checked with :func:`check_words`) into ``out`` (int16)."""
    count = out.size
    p = np.uint64(P)
    for w in range(words.size):
        v = np.uint64(words[w])
        for i in range(GROUP):
            flat = w * GROUP + i
            if flat < count:
                out[flat] = v % p
            v //= p


@numba.njit(cache=True)
def pack_values(values: np.ndarray, words: np.ndarray) -> None:
    """Values in [0, 67) (flat) into int32 ``words`` (same layout as pack_zp)."""
    packer = np.zeros(3, dtype=np.int64)
    for flat in range(values.size):
        _push(words, packer, np.int64(values[flat]))
    _flush(words, packer)


@numba.njit(cache=True)
def decide_packed(words0: np.ndarray, words1: np.ndarray, n: int, bits: int,
                  out: np.ndarray) -> None:
    """The helper's PrivateCompare output: ``out[row]`` (zeroed bools) = some value of the row
    has d0 + d1 ≡ 0 (mod 67). Both word arrays must have passed :func:`check_words`."""
    count = n * bits
    p = np.uint64(P)
    row, col = 0, 0
    for w in range(words0.size):
        v0 = np.uint64(words0[w])
        v1 = np.uint64(words1[w])
        for i in range(GROUP):
            if w * GROUP + i >= count:
                break
            if (v0 % p + v1 % p) % p == 0:
                out[row] = True
            v0 //= p
            v1 //= p
            col += 1
            if col == bits:
                col = 0
                row += 1


@numba.njit(cache=True)
def deal_corrections_packed(r: np.ndarray, shares0: np.ndarray, bits: int,
                            words: np.ndarray) -> None:
    """(bit_i(r) − shares0) mod 67 for the ``bits`` low bits of each r (MSB first), packed:
    P1's shares of the bits of r when P0's are ``shares0`` [n·bits]."""
    packer = np.zeros(3, dtype=np.int64)
    for row in range(r.shape[0]):
        for i in range(bits):
            bit = (r[row] >> (bits - 1 - i)) & 1
            _push(words, packer, (bit - np.int64(shares0[row * bits + i])) % P)
    _flush(words, packer)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel with the argument types the DReLU
    uses, so no party compiles inside a timed run."""
    n, bits = 2, 3
    i16 = np.zeros((n, bits), dtype=np.int16)
    i64 = np.zeros(n, dtype=np.int64)
    words = np.zeros(2, dtype=np.int32)
    reduce_words(np.zeros(4, dtype=np.uint16), 67, np.zeros(4, dtype=np.int16))
    pc_message_packed(0, i16, i64, i64, i16, i16, i64, bits, words)
    check_words(words, n * bits)
    unpack_words(words, np.zeros(n * bits, dtype=np.int16))
    pack_values(np.zeros(n * bits, dtype=np.int16), words)
    decide_packed(words, words, n, bits, np.zeros(n, dtype=np.bool_))
    deal_corrections_packed(i64, np.zeros(n * bits, dtype=np.int16), bits, words)
