"""CPU kernels (numba) of the DReLU's hot loops: exact sampling mod small moduli, PrivateCompare
messages, the Z_67 wire format, the helper's decision and its dealt bit corrections.

The torch versions in :mod:`.private_compare` and :mod:`.zp` make ~15 passes over an [n, ℓ]
int16 array per message (one per operation, two of them integer remainders); these kernels
make one pass per row and write the packed words directly, which is what makes the DReLU cheap
in CPU time. They compute exactly what the torch versions compute (tested against them and
against plain-Python references): same message layout (row-major, rotated rows), same packing
(five values mod 67 per little-endian int32 word, ``Σ v_i·67^i``), same checks on received
words (error codes, turned into :class:`~secure_inference.mpc.errors.ProtocolError` by the
callers).

How they are fast: rows are handled in blocks of a multiple of five rows, since five rows of ℓ
values are exactly ℓ packed words, so a block is computed into a small buffer and packed word
by word with no carried packing state; within a row, the only sequential step (the suffix sums
of PrivateCompare) is a loop of one addition, and every other step is an element-wise loop
that LLVM vectorises, over a fixed width of 16, 32 or 64 lanes where the arrays allow it (no
scalar remainder loops, which dominate rows of 20–30 values); indices are unsigned (numba then
skips its negative-index wrap-around); every remainder is an exact multiply-shift
(:func:`_mod67_small`, :func:`_div67` and the sampling reduction) instead of a division, on
values small enough for the bound proved next to it. Nothing checks bounds inside the
kernels: the Python-level callers check the array sizes, and a test compiles every kernel
with numba's bounds checking on and runs it at the edges.
"""
from __future__ import annotations

import numba
import numpy as np

P = 67
GROUP = 5
WORD_LIMIT = P ** GROUP
_POW = np.array([P ** i for i in range(GROUP)], dtype=np.int64)
_SUB_BLOCK = 64             # words per vectorised step of the sampling kernel
_DECIDE_ROWS = 320          # rows per block of the helper's kernels (a multiple of GROUP)

OK, WORD_OUT_OF_RANGE, NONZERO_PADDING = 0, 1, 2
MAX_HIGH = 1 << 15          # largest modulus of the 16-bit sampling (its values fit int16)

# ⌊v/67⌋ = (v·M) >> 38 with M = ⌈2^38/67⌉ for every 0 ≤ v < 2^31: M·67 − 2^38 = e ≤ 66, so the
# error v·e/(67·2^38) stays below 2^31·66/(67·2^38) < 1/67 — never reaching the next integer.
# M < 2^32 and v·M < 2^63: exact in int64.
_M67 = -(-(1 << 38) // P)
_S67 = 38

# v mod 67 = v − 67·((v·15651) >> 20) for 0 ≤ v < 25575: 15651 = ⌈2^20/67⌉ and
# 15651·67 − 2^20 = 41, so the error v·41/(67·2^20) stays below 1/67 while v·41 < 2^20; and
# v·15651 < 2^31, so int32 arithmetic (sixteen lanes per vector) is exact.
_M67_SMALL = 15651
_S67_SMALL = 20
SMALL_LIMIT = 25575

_NJ = dict(cache=True, error_model="numpy", nogil=True)


@numba.njit(inline="always", **_NJ)
def _div67(v):
    """⌊v/67⌋ for 0 ≤ v < 2^31 (int64)."""
    return (v * _M67) >> _S67


@numba.njit(inline="always", **_NJ)
def _mod67_small(v):
    """v mod 67 for 0 ≤ v < SMALL_LIMIT (int32)."""
    return v - ((v * np.int32(_M67_SMALL)) >> np.int32(_S67_SMALL)) * np.int32(P)


SU_HIGH = 66 * P             # one draw holds both PrivateCompare masks: s − 1 and u


@numba.njit(inline="always", **_NJ)
def _split_su(v):
    """(s, u) = (⌊v/67⌋ + 1, v mod 67) for 0 ≤ v < SU_HIGH (int32; SU_HIGH < SMALL_LIMIT, so
    the multiply-shift quotient of :func:`_mod67_small` is exact)."""
    q = (v * np.int32(_M67_SMALL)) >> np.int32(_S67_SMALL)
    return q + np.int32(1), v - q * np.int32(P)


def join_su(s: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The one draw (s − 1)·67 + u (int16) holding the PrivateCompare masks s ∈ [1, 66] and
    u ∈ [0, 66]: uniform on [0, 66·67) exactly when s and u are independent and uniform."""
    return ((s.astype(np.int32) - 1) * P + u.astype(np.int32)).astype(np.int16)


def _check_high(high: int) -> None:
    if not 2 <= high <= MAX_HIGH:
        raise ValueError(f"high must be in [2, {MAX_HIGH}], got {high}")


def reduce_words(words: np.ndarray, high: int, out: np.ndarray) -> int:
    """``out[i] = words[i] mod high`` (uint16 → int16, 2 ≤ high ≤ 2^15); returns how many
    words lie at or above the largest multiple of ``high`` below 2^16 (the caller redraws
    those)."""
    _check_high(high)
    bad = np.empty(words.size, dtype=np.int64)
    return sample_words(words, high, out, bad)


def sample_words(words: np.ndarray, high: int, out: np.ndarray, bad: np.ndarray) -> int:
    """``out[i] = words[i] mod high`` (uint16 → int16, 2 ≤ high ≤ 2^15) and the positions i
    (ascending) of the words at or above the largest multiple of ``high`` below 2^16, the
    rejected ones, in ``bad[:count]`` (int64, at least ``words.size`` long); returns count."""
    _check_high(high)
    if out.size < words.size or bad.size < words.size:
        raise ValueError("out and bad must hold one entry per word")
    return _sample_words(words, np.int64(high), np.int64(65536 // high),
                         np.int64((65536 // high) * high), out, bad)


@numba.njit(**_NJ)
def _sample_words(words, high, inv, limit, out, bad) -> int:
    # q = ⌊w·⌊2^16/h⌋ / 2^16⌋ is ⌊w/h⌋ or one less (w·(2^16/h − ⌊2^16/h⌋)/2^16 < w/2^16 < 1),
    # so w − q·h lies in [0, 2h) and one conditional subtraction makes it w mod h. All in
    # 32 bits (w·⌊2^16/h⌋ < 2^31), which LLVM vectorises sixteen words at a time.
    n = words.size
    h = np.uint32(high)
    m = np.uint32(inv)
    lim = np.uint32(limit)
    for i in range(n):
        w = np.uint32(words[i])
        rem = w - ((w * m) >> np.uint32(16)) * h
        out[i] = np.int16(rem - np.uint32(rem >= h) * h)
    # the rejected positions: a vectorised test per run of 64 words, a scan only of runs with
    # one (rare: 0.015% of the words for 67)
    nbad = 0
    full = n - n % _SUB_BLOCK
    for a in range(0, full, _SUB_BLOCK):
        ws = words[a:a + _SUB_BLOCK]
        hit = np.uint32(0)
        for i in range(_SUB_BLOCK):
            hit |= np.uint32(np.uint32(ws[i]) >= lim)
        if hit:     # branch-free compaction: always write, advance only on a rejection
            for i in range(_SUB_BLOCK):
                bad[nbad] = a + i
                nbad += np.int64(np.uint32(ws[i]) >= lim)
    for i in range(full, n):
        if np.uint32(words[i]) >= lim:
            bad[nbad] = i
            nbad += 1
    return nbad


def redraw_words(words: np.ndarray, high: int, out: np.ndarray, bad: np.ndarray) -> int:
    """One round of redraws: ``out[bad[i]] = words[i] mod high`` for every rejected position
    ``bad[i]`` (int64, ascending; one uint16 word each, in order); the positions whose new word
    is rejected again are moved, still ascending, to the front of ``bad``; returns their
    count."""
    _check_high(high)
    if words.size != bad.size:
        raise ValueError("one word per rejected position")
    if bad.size and (int(bad.min()) < 0 or int(bad.max()) >= out.size):
        raise ValueError("rejected positions must lie inside out")
    return _redraw_words(words, np.int64(high), np.int64((65536 // high) * high), out, bad)


@numba.njit(**_NJ)
def _redraw_words(words, high, limit, out, bad) -> int:
    k = 0
    for i in range(bad.size):
        w = np.int64(words[i])
        pos = bad[i]
        out[pos] = np.int16(w % high)
        if w >= limit:
            bad[k] = pos
            k += 1
    return k


@numba.njit(**_NJ)
def _pack_group(buf, values, words) -> None:
    """Pack ``buf[:values]`` (zero padded to whole words) into ``words[:⌈values/5⌉]``."""
    nw = (values + GROUP - 1) // GROUP
    for k in range(values, nw * GROUP):
        buf[k] = 0
    for k in range(nw):
        g = buf[GROUP * k:GROUP * k + GROUP]
        words[k] = g[0] + P * (g[1] + P * (g[2] + P * (g[3] + P * g[4])))


def pc_message_packed(j: int, xbits: np.ndarray, r: np.ndarray, beta: np.ndarray,
                      su: np.ndarray, shift: np.ndarray, bits: int,
                      words: np.ndarray) -> None:
    """Party ``j``'s PrivateCompare message for rows of (bit shares ``xbits`` [n, bits] mod 67,
    public ``r`` [n], bits ``beta`` [n], masks ``su`` [n, bits] (int16 in [0, 66·67), the
    pair s = ⌊su/67⌋ + 1 ∈ [1, 66], u = su mod 67: :func:`join_su`), rotations ``shift`` [n];
    all C-contiguous) packed into ``words`` (int32, ⌈n·bits/5⌉). Same values as
    :func:`.private_compare.private_compare_message` followed by :func:`.zp.pack_zp`.

    Most rows go through :func:`_pc_padded` (element-wise loops of a fixed width ≥ ``bits``,
    reading into the next row, whose extra lanes are computed and thrown away: no short-loop
    remainders, which dominate rows of 20–30 values); the last rows, where such a read would
    pass the end of the arrays, through :func:`_pc_exact`. Both compute the same values."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits}")
    n = r.shape[0]
    _check_pc_shapes(n, bits, su, words, beta, shift)
    if xbits.shape != (n, bits) or not xbits.flags.c_contiguous:
        raise ValueError("xbits and su must be C-contiguous [n, bits] arrays")
    _pc_dispatch(j, xbits, r, beta, su, shift, bits, words, packed=False)


def pc_message_from_words(j: int, xwords: np.ndarray, r: np.ndarray, beta: np.ndarray,
                          su: np.ndarray, shift: np.ndarray, bits: int,
                          words: np.ndarray) -> None:
    """:func:`pc_message_packed` with the bit shares given packed, as the helper deals them:
    ``xwords`` holds the [n, bits] values mod 67 five per int32 word (⌈n·bits/5⌉ words that
    passed :func:`check_words`). Each group of five rows is exactly ``bits`` words, unpacked
    into a small buffer right where it is used, so no [n, bits] array of shares is written
    and read back."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in [1, 64], got {bits}")
    n = r.shape[0]
    _check_pc_shapes(n, bits, su, words, beta, shift)
    if xwords.shape != words.shape or xwords.dtype != np.int32:
        raise ValueError(f"xwords must hold {words.size} int32 words")
    _pc_dispatch(j, xwords, r, beta, su, shift, bits, words, packed=True)


def _check_pc_shapes(n: int, bits: int, su: np.ndarray, words: np.ndarray,
                     beta: np.ndarray, shift: np.ndarray) -> None:
    if beta.shape != (n,) or shift.shape != (n,):
        raise ValueError(f"r, beta and shift must hold {n} values each")
    if su.shape != (n, bits) or not su.flags.c_contiguous or su.dtype != np.int16:
        raise ValueError("xbits and su must be C-contiguous [n, bits] arrays (su: int16)")
    if words.size != -(-n * bits // GROUP):
        raise ValueError(f"words must hold {-(-n * bits // GROUP)} words, got {words.size}")


def _pc_dispatch(j, x, r, beta, su, shift, bits, words, *, packed: bool) -> None:
    n = r.shape[0]
    width = 16 if bits <= 16 else 32 if bits <= 32 else 64
    safe = max(0, (n * bits - width) // bits + 1) if n else 0   # rows whose wide reads fit
    safe -= safe % GROUP
    if safe:
        _PC_PADDED[width, packed](j, x, r, beta, su, shift, bits, words, safe)
    if safe < n:
        if packed:   # the tail's words start at a whole group of rows (safe is a multiple of 5)
            tail = np.empty((n - safe) * bits, dtype=np.int16)
            unpack_words(x[safe * bits // GROUP:], tail)
            x = tail.reshape(n - safe, bits)
        else:
            x = x[safe:]
        _pc_exact(j, x, r[safe:], beta[safe:], su[safe:], shift[safe:], bits,
                  words[safe * bits // GROUP:])


def _make_pc_padded(width: int, packed: bool):
    """:func:`pc_message_packed` (``packed``: :func:`pc_message_from_words`) on rows
    [0, safe) (a multiple of five, and row safe − 1 plus ``width`` values still inside the
    arrays) with element-wise loops over ``width`` lanes. Unsigned indices: numba then skips
    the negative-index wrap-around on every access."""

    @numba.njit(**_NJ)
    def pc_padded(j, xsrc, r, beta, su, shift, bits, words, safe):
        top = np.int64(-1) if bits == 64 else (np.int64(1) << bits) - 1
        jj = np.int32(j)
        pos = np.int32(P * 66)
        xf = xsrc.reshape(-1)
        suf = su.reshape(-1)
        cb = np.empty(width, dtype=np.int32)
        st = np.empty(width, dtype=np.int32)
        dd = np.zeros(2 * width, dtype=np.int32)
        buf = np.empty(GROUP * bits + width, dtype=np.int32)
        xb = np.zeros(GROUP * bits + width, dtype=np.int32)   # packed: a group's shares
        for g0 in range(0, safe, GROUP):
            if packed:      # five rows of ``bits`` values are exactly ``bits`` words
                wb = np.uint64((g0 // GROUP) * bits)
                for k in range(bits):
                    v = np.int64(xf[wb + np.uint64(k)])
                    o = np.uint64(GROUP * k)
                    for i in range(GROUP):
                        q = _div67(v)
                        xb[o + np.uint64(i)] = np.int32(v - q * P)
                        v = q
            for t in range(GROUP):
                row = g0 + t
                flip = beta[row] != 0
                q = (r[row] + 1) & top if flip else r[row]
                sigma = np.int32(-1) if flip else np.int32(1)
                uo = np.uint64(row * bits)
                xo = np.uint64(t * bits) if packed else uo
                for i in range(width):      # lanes ≥ bits: the next row's values, unused
                    qb = np.int32((q >> ((bits - 1 - i) & 63)) & 1)
                    x = (np.int32(xb[xo + np.uint64(i)]) if packed
                         else np.int32(xf[uo + np.uint64(i)]))
                    cb[i] = sigma * (jj * qb - x) + jj + pos
                    st[i] = x - np.int32(2) * qb * x + jj * qb
                acc = np.int32(0)
                for i in range(bits):                   # the one sequential step
                    w = st[i]
                    cb[i] += acc
                    acc += w
                if flip and r[row] == top:  # β = 1, R = 2^ℓ − 1: exactly one zero
                    cb[0] = 0
                    for i in range(1, bits):
                        cb[i] = jj
                off = shift[row]
                if off < 0 or off >= bits:
                    raise ValueError("rotation offset out of range")
                if j == 0:
                    for i in range(width):
                        sv, uv = _split_su(np.int32(suf[uo + np.uint64(i)]))
                        dd[i] = _mod67_small(_mod67_small(cb[i]) * sv + uv)
                else:
                    for i in range(width):
                        sv, uv = _split_su(np.int32(suf[uo + np.uint64(i)]))
                        dd[i] = _mod67_small(_mod67_small(cb[i]) * sv + (np.int32(P) - uv))
                # rotation: position k of the row holds d[(k + off) mod bits]; the first run
                # is copied ``width`` wide (what lands past position bits − off is overwritten
                # by the second run, the next row, or lies past the group's values)
                ub = np.uint64(t * bits)
                uoff = np.uint64(off)
                for i in range(width):
                    buf[ub + np.uint64(i)] = dd[uoff + np.uint64(i)]
                ub = np.uint64(t * bits + bits - off)
                for i in range(off):
                    buf[ub + np.uint64(i)] = dd[np.uint64(i)]
            uw = np.uint64((g0 // GROUP) * bits)
            for k in range(bits):
                g = np.uint64(GROUP * k)
                words[uw + np.uint64(k)] = buf[g] + P * (buf[g + np.uint64(1)] + P * (
                    buf[g + np.uint64(2)] + P * (buf[g + np.uint64(3)]
                                                 + P * buf[g + np.uint64(4)])))

    return pc_padded


_PC_PADDED = {(w, packed): _make_pc_padded(w, packed) for w in (16, 32, 64)
              for packed in (False, True)}


@numba.njit(**_NJ)
def _pc_exact(j: int, xbits: np.ndarray, r: np.ndarray, beta: np.ndarray,
              su: np.ndarray, shift: np.ndarray, bits: int, words: np.ndarray) -> None:
    """:func:`pc_message_packed` with loops of exactly ``bits`` values per row: party ``j``'s
    PrivateCompare message for rows of (bit shares ``xbits`` [n, bits] mod 67,
    public ``r`` [n], bits ``beta`` [n], masks ``s``, ``u`` [n, bits], rotations ``shift`` [n])
    packed into ``words`` (int32, ⌈n·bits/5⌉). Same values as
    :func:`.private_compare.private_compare_message` followed by :func:`.zp.pack_zp`.

    Per value i (MSB first) c_i = σ(j·q_i − x_i) + j + Σ_{k<i} w_k with w_k = x_k(1 − 2q_k) +
    j·q_k ∈ [−66, 67], so |c_i| ≤ 63·67 + 67 < 67·66: adding 67·66 (≡ 0) makes it positive,
    c_i + 67·66 < 67·132 and s_i·(c_i mod 67) ± u_i ≤ 66·66 + 67, both below
    :data:`SMALL_LIMIT` (:func:`_mod67_small`)."""
    n = r.shape[0]
    top = np.int64(-1) if bits == 64 else (np.int64(1) << bits) - 1
    jj = np.int32(j)
    pos = np.int32(P * 66)
    cb = np.empty(bits, dtype=np.int32)       # c_i of one row (+ 67·66)
    st = np.empty(bits, dtype=np.int32)       # w_i of one row
    buf = np.empty(GROUP * bits, dtype=np.int32)
    for g0 in range(0, n, GROUP):
        rows = min(GROUP, n - g0)
        for t in range(rows):
            row = g0 + t
            flip = beta[row] != 0
            q = (r[row] + 1) & top if flip else r[row]
            sigma = np.int32(-1) if flip else np.int32(1)
            xr = xbits[row]
            for i in range(bits):                       # element-wise (vectorised)
                qb = np.int32((q >> (bits - 1 - i)) & 1)
                x = np.int32(xr[i])
                cb[i] = sigma * (jj * qb - x) + jj + pos
                st[i] = x - np.int32(2) * qb * x + jj * qb   # shares of x_i ⊕ q_i
            acc = np.int32(0)
            for i in range(bits):                       # the one sequential step
                w = st[i]
                cb[i] += acc
                acc += w
            if flip and r[row] == top:  # β = 1, R = 2^ℓ − 1: X ≤ R always; exactly one zero
                cb[0] = 0
                for i in range(1, bits):
                    cb[i] = jj
            off = shift[row]
            if off < 0 or off >= bits:
                raise ValueError("rotation offset out of range")
            sur = su[row]
            # d_i = (s_i·c_i ± u_i) mod 67, written rotated: position k of the row holds
            # d[(k + off) mod bits], i.e. two contiguous runs (element-wise, vectorised)
            k = bits - off
            dst = buf[t * bits:t * bits + k]
            ca, sua = cb[off:], sur[off:]
            for i in range(k):
                si, ui = _split_su(np.int32(sua[i]))
                mask = ui if j == 0 else np.int32(P) - ui
                dst[i] = _mod67_small(_mod67_small(ca[i]) * si + mask)
            dst = buf[t * bits + k:(t + 1) * bits]
            for i in range(off):
                si, ui = _split_su(np.int32(sur[i]))
                mask = ui if j == 0 else np.int32(P) - ui
                dst[i] = _mod67_small(_mod67_small(cb[i]) * si + mask)
        base = (g0 // GROUP) * bits
        _pack_group(buf, rows * bits, words[base:base + bits])


@numba.njit(**_NJ)
def check_words(words: np.ndarray, count: int) -> int:
    """OK, WORD_OUT_OF_RANGE or NONZERO_PADDING for ``count`` values packed in ``words``
    (``⌈count/5⌉`` int32 words)."""
    bad = False
    for w in range(words.size):                         # vectorised (no early exit)
        v = words[w]
        bad |= (v < 0) | (v >= WORD_LIMIT)
    if bad:
        return WORD_OUT_OF_RANGE
    for flat in range(count, words.size * GROUP):       # only the last word has padding
        if (np.int64(words[flat // GROUP]) // _POW[flat % GROUP]) % P != 0:
            return NONZERO_PADDING
    return OK


@numba.njit(**_NJ)
def unpack_words(words: np.ndarray, out: np.ndarray) -> None:
    """The values packed in ``words`` (checked with :func:`check_words`) into ``out`` (int16)."""
    count = out.size
    full = count // GROUP
    for w in range(full):
        v = np.int64(words[w])
        o = GROUP * w
        for i in range(GROUP):
            q = _div67(v)
            out[o + i] = v - q * P
            v = q
    v = np.int64(words[full]) if full < words.size else np.int64(0)
    for flat in range(full * GROUP, count):
        q = _div67(v)
        out[flat] = v - q * P
        v = q


@numba.njit(**_NJ)
def pack_values(values: np.ndarray, words: np.ndarray) -> None:
    """Values in [0, 67) (flat) into int32 ``words`` (same layout as pack_zp)."""
    count = values.size
    full = count // GROUP
    for k in range(full):
        o = GROUP * k
        words[k] = (np.int64(values[o]) + P * (np.int64(values[o + 1]) + P * (
            np.int64(values[o + 2]) + P * (np.int64(values[o + 3])
                                           + P * np.int64(values[o + 4])))))
    if full * GROUP < count:
        acc = np.int64(0)
        for flat in range(count - 1, full * GROUP - 1, -1):
            acc = acc * P + np.int64(values[flat])
        words[full] = acc


@numba.njit(**_NJ)
def decide_packed(words0: np.ndarray, words1: np.ndarray, n: int, bits: int,
                  out: np.ndarray) -> None:
    """The helper's PrivateCompare output: ``out[row]`` = some value of the row has
    d0 + d1 ≡ 0 (mod 67). Both word arrays must have passed :func:`check_words`."""
    zero = np.empty(_DECIDE_ROWS * bits + GROUP, dtype=np.uint8)
    for g0 in range(0, n, _DECIDE_ROWS):      # blocks of whole words (a multiple of 5 rows)
        rows = min(_DECIDE_ROWS, n - g0)
        base = np.uint64((g0 // GROUP) * bits)
        nw = (rows * bits + GROUP - 1) // GROUP
        for k in range(nw):                             # flat over the block's words
            a = np.int64(words0[base + np.uint64(k)])
            b = np.int64(words1[base + np.uint64(k)])
            z = np.uint64(GROUP * k)
            for i in range(GROUP):
                qa = _div67(a)
                qb = _div67(b)
                sm = (a - qa * P) + (b - qb * P)    # in [0, 132]: ≡ 0 iff 0 or 67
                zero[z + np.uint64(i)] = np.uint8((sm == 0) | (sm == P))
                a = qa
                b = qb
        for t in range(rows):
            hit = np.uint8(0)
            zt = np.uint64(t * bits)
            for i in range(bits):
                hit |= zero[zt + np.uint64(i)]
            out[np.uint64(g0 + t)] = hit != 0


@numba.njit(**_NJ)
def deal_corrections_packed(r: np.ndarray, shares0: np.ndarray, bits: int,
                            words: np.ndarray) -> None:
    """(bit_i(r) − shares0) mod 67 for the ``bits`` low bits of each r (MSB first), packed:
    P1's shares of the bits of r when P0's are ``shares0`` [n·bits]."""
    n = r.shape[0]
    buf = np.empty(_DECIDE_ROWS * bits + GROUP, dtype=np.int32)
    for g0 in range(0, n, _DECIDE_ROWS):      # blocks of whole words (a multiple of 5 rows)
        rows = min(_DECIDE_ROWS, n - g0)
        for t in range(rows):
            row = g0 + t
            rv = r[row]
            so = np.uint64(row * bits)
            bo = np.uint64(t * bits)
            for i in range(bits):                       # element-wise (vectorised)
                v = (np.int32((rv >> (bits - 1 - i)) & 1)
                     - np.int32(shares0[so + np.uint64(i)]))          # in [−66, 1]
                buf[bo + np.uint64(i)] = v + np.int32(P) * np.int32(v < 0)
        m = rows * bits
        nw = (m + GROUP - 1) // GROUP
        for k in range(m, nw * GROUP):
            buf[k] = 0
        uw = np.uint64((g0 // GROUP) * bits)
        for k in range(nw):
            g = np.uint64(GROUP * k)
            words[uw + np.uint64(k)] = buf[g] + P * (buf[g + np.uint64(1)] + P * (
                buf[g + np.uint64(2)] + P * (buf[g + np.uint64(3)] + P * buf[g + np.uint64(4)])))


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel with the argument types the DReLU
    uses, so no party compiles inside a timed run (also those of :mod:`.drelu_kernels`)."""
    from . import drelu_kernels
    drelu_kernels.warm_up()
    n, bits = 2, 3
    i16 = np.zeros((n, bits), dtype=np.int16)
    i64 = np.zeros(n, dtype=np.int64)
    words = np.zeros(2, dtype=np.int32)
    reduce_words(np.zeros(4, dtype=np.uint16), 67, np.zeros(4, dtype=np.int16))
    redraw_words(np.zeros(1, dtype=np.uint16), 67, np.zeros(4, dtype=np.int16),
                 np.zeros(1, dtype=np.int64))
    pc_message_packed(0, i16, i64, i64, i16, i64, bits, words)
    pc_message_from_words(1, np.zeros(2, dtype=np.int32), i64, i64, i16, i64, bits, words)
    for (_, packed), kernel in _PC_PADDED.items():
        kernel(0, words if packed else i16, i64, i64, i16, i64, bits, words, 0)
    check_words(words, n * bits)
    unpack_words(words, np.zeros(n * bits, dtype=np.int16))
    pack_values(np.zeros(n * bits, dtype=np.int16), words)
    decide_packed(words, words, n, bits, np.zeros(n, dtype=np.bool_))
    deal_corrections_packed(i64, np.zeros(n * bits, dtype=np.int16), bits, words)
