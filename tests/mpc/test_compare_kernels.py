"""The DReLU's numba kernels (secure_inference.mpc.protocols.compare_kernels) against plain-Python
references written from the protocol's definition (not from the torch versions): exact sampling
mod h with the rejected positions, the PrivateCompare message packed for the wire (β = 1 and
R = 2^ℓ − 1 rows, every rotation), the Z_67 word checks, unpacking and packing, the helper's
decision and its dealt corrections, at widths 3 … 64, for n = 0, 1 and counts around the
five-row groups the kernels work in."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from secure_inference.mpc.protocols import compare_kernels as K

P = 67


def _pack_ref(values: list[int]) -> list[int]:
    """Five values per word, Σ v_i·67^i, the last word zero padded."""
    out = []
    for a in range(0, len(values), 5):
        chunk = values[a:a + 5] + [0] * (5 - len(values[a:a + 5]))
        out.append(sum(v * P ** i for i, v in enumerate(chunk)))
    return out


def _unpack_ref(words: list[int], count: int) -> list[int]:
    vals = []
    for w in words:
        for _ in range(5):
            vals.append(w % P)
            w //= P
    return vals[:count]


def _msb_bits(v: int, bits: int) -> list[int]:
    v %= 1 << bits
    return [(v >> (bits - 1 - i)) & 1 for i in range(bits)]


def _pc_ref(j, xbits, r, beta, s, u, shift, bits) -> list[int]:
    """SecureNN's PrivateCompare message of party j, row by row, in Python integers."""
    mod = 1 << bits
    out = []
    for row in range(len(r)):
        rr = int(r[row]) % mod
        b = int(beta[row])
        q = (rr + 1) % mod if b else rr
        qb = _msb_bits(q, bits)
        x = [int(v) for v in xbits[row]]
        sigma = 1 - 2 * b
        c = []
        for i in range(bits):
            higher = sum(x[k] + j * qb[k] - 2 * qb[k] * x[k] for k in range(i))
            c.append(sigma * (j * qb[i] - x[i]) + j + higher)
        if b and rr == mod - 1:
            c = [0] + [j] * (bits - 1)
        d = []
        for i in range(bits):
            mask = int(u[row][i]) if j == 0 else -int(u[row][i])
            d.append((int(s[row][i]) * c[i] + mask) % P)
        off = int(shift[row])
        out.extend(d[(k + off) % bits] for k in range(bits))
    return out


def _pc_inputs(rng: random.Random, n: int, bits: int):
    top = (1 << bits) - 1
    xbits = np.array([[rng.randrange(P) for _ in range(bits)] for _ in range(n)],
                     dtype=np.int16).reshape(n, bits)
    r_u = [rng.choice([0, 1, top, top - 1, rng.randrange(1 << bits)]) for _ in range(n)]
    beta = np.array([rng.randrange(2) for _ in range(n)], dtype=np.int64)
    if n:
        r_u[0], beta[0] = top, 1          # the special row
    if n > 3:
        r_u[3], beta[3] = top, 0
    r = np.array([v - (1 << 64) if v >= 1 << 63 else v for v in r_u], dtype=np.int64)
    s = np.array([[rng.choice([1, 66, rng.randrange(1, P)]) for _ in range(bits)]
                  for _ in range(n)], dtype=np.int16).reshape(n, bits)
    u = np.array([[rng.choice([0, 66, rng.randrange(P)]) for _ in range(bits)]
                  for _ in range(n)], dtype=np.int16).reshape(n, bits)
    shift = np.array([rng.choice([0, bits - 1, rng.randrange(bits)]) for _ in range(n)],
                     dtype=np.int64)
    return xbits, r, beta, s, u, shift


@pytest.mark.parametrize("bits", [3, 26, 27, 63, 64])
@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 12])
def test_pc_message_packed_equals_the_protocol_definition(bits, n):
    rng = random.Random(1000 * bits + n)
    xbits, r, beta, s, u, shift = _pc_inputs(rng, n, bits)
    for j in (0, 1):
        words = np.full(-(-n * bits // 5), -7, dtype=np.int32)   # garbage: all must be written
        K.pc_message_packed(j, xbits, r, beta, K.join_su(s, u), shift, bits, words)
        assert words.tolist() == _pack_ref(_pc_ref(j, xbits, r, beta, s, u, shift, bits))


def test_pc_message_has_one_zero_exactly_where_the_comparison_says():
    """Both parties' messages from shares of X: the sum has a zero (mod 67) iff β ⊕ [X > R]."""
    rng = random.Random(5)
    bits, n = 27, 40
    xbits, r, beta, s, u, shift = _pc_inputs(rng, n, bits)
    x = [rng.randrange(1 << bits) for _ in range(n)]
    x[1] = int(r[1]) % (1 << bits)                        # X = R
    x0 = np.array([[rng.randrange(P) for _ in range(bits)] for _ in range(n)], dtype=np.int16)
    x1 = np.array([[(b - int(x0[row, i])) % P for i, b in enumerate(_msb_bits(x[row], bits))]
                   for row in range(n)], dtype=np.int16)
    nw = -(-n * bits // 5)
    w0, w1 = np.empty(nw, dtype=np.int32), np.empty(nw, dtype=np.int32)
    K.pc_message_packed(0, x0, r, beta, K.join_su(s, u), shift, bits, w0)
    K.pc_message_packed(1, x1, r, beta, K.join_su(s, u), shift, bits, w1)
    d0 = _unpack_ref(w0.tolist(), n * bits)
    d1 = _unpack_ref(w1.tolist(), n * bits)
    out = np.empty(n, dtype=np.bool_)
    K.decide_packed(w0, w1, n, bits, out)
    for row in range(n):
        zeros = sum((d0[row * bits + i] + d1[row * bits + i]) % P == 0 for i in range(bits))
        want = bool(beta[row]) ^ (x[row] > int(r[row]) % (1 << bits))
        assert (zeros == 1) == want and zeros <= 1
        assert bool(out[row]) == want


def test_pc_message_refuses_a_rotation_out_of_range():
    xbits, r, beta, s, u, shift = _pc_inputs(random.Random(2), 3, 5)
    shift[1] = 5
    with pytest.raises(ValueError, match="rotation"):
        K.pc_message_packed(0, xbits, r, beta, K.join_su(s, u), shift, 5,
                            np.empty(3, dtype=np.int32))


def test_sample_words_every_word_and_every_modulus():
    words = np.arange(65536, dtype=np.uint16)
    rng = np.random.default_rng(3)
    rng.shuffle(words)
    out = np.empty(words.size, dtype=np.int16)
    bad = np.empty(words.size, dtype=np.int64)
    for high in [*range(2, 258), K.SU_HIGH, 21845, 21846, 32767, K.MAX_HIGH]:
        count = K.sample_words(words, high, out, bad)
        limit = (65536 // high) * high
        assert np.array_equal(out, (words % high).astype(np.int16)), high
        assert np.array_equal(bad[:count], np.flatnonzero(words >= limit)), high
    with pytest.raises(ValueError):
        K.sample_words(words, K.MAX_HIGH + 1, out, bad)
    with pytest.raises(ValueError):
        K.sample_words(words, 67, out[:-1], bad)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 127, 128, 200])
def test_sample_words_rejected_positions_at_run_edges(size):
    """Rejections at the first and last word of each run of 64 and in the tail, in order."""
    high, limit = 67, (65536 // 67) * 67
    words = np.full(size, 5, dtype=np.uint16)
    want = sorted({i for i in (0, 62, 63, 64, 127, 128, size - 1) if 0 <= i < size})
    words[want] = [limit + (i % (65536 - limit)) for i in want]
    out = np.empty(size, dtype=np.int16)
    bad = np.empty(size, dtype=np.int64)
    assert K.sample_words(words, high, out, bad) == len(want)
    assert bad[:len(want)].tolist() == want
    assert out.tolist() == [int(w) % high for w in words]


def test_multiply_shift_remainders_are_exact_on_their_whole_range():
    mod_small = numba.njit(lambda v: K._mod67_small(v))
    div = numba.njit(lambda v: K._div67(v))
    v = np.arange(K.SMALL_LIMIT, dtype=np.int32)
    assert np.array_equal(np.array([mod_small(np.int32(x)) for x in v[:300]]), v[:300] % P)
    assert np.array_equal(numba.njit(lambda a: np.array([K._mod67_small(x) for x in a]))(v),
                          v % P)
    big = np.concatenate([np.arange(0, 5000), np.arange(2 ** 31 - 5000, 2 ** 31),
                          np.random.default_rng(0).integers(0, 2 ** 31, 20000),
                          np.arange(1, 2 ** 31 // P) * P, np.arange(1, 2 ** 31 // P) * P - 1])
    got = numba.njit(lambda a: np.array([K._div67(x) for x in a]))(big.astype(np.int64))
    assert np.array_equal(got, big // P)
    assert div(np.int64(K.WORD_LIMIT - 1)) == (K.WORD_LIMIT - 1) // P


@pytest.mark.parametrize("count", [0, 1, 4, 5, 6, 9, 10, 11, 1003])
def test_pack_unpack_check_against_plain_python(count):
    rng = random.Random(count)
    vals = [rng.choice([0, 66, rng.randrange(P)]) for _ in range(count)]
    words = np.full(-(-count // 5), -1, dtype=np.int32)
    K.pack_values(np.array(vals, dtype=np.int16), words)
    assert words.tolist() == _pack_ref(vals)
    assert K.check_words(words, count) == K.OK
    out = np.full(count, -1, dtype=np.int16)
    K.unpack_words(words, out)
    assert out.tolist() == vals == _unpack_ref(words.tolist(), count)


@pytest.mark.parametrize("count", [1, 3, 5, 7, 10, 12])
def test_check_words_refuses_out_of_range_words_and_nonzero_padding(count):
    nw = -(-count // 5)
    for pos in range(nw):
        for bad in (-1, -(2 ** 31), K.WORD_LIMIT, 2 ** 31 - 1):
            words = np.zeros(nw, dtype=np.int32)
            words[pos] = bad
            assert K.check_words(words, count) == K.WORD_OUT_OF_RANGE
    for digit in range(count % 5 or 5, 5):      # each padding digit of the last word
        if count % 5 == 0:
            break
        words = np.zeros(nw, dtype=np.int32)
        words[-1] = P ** digit
        assert K.check_words(words, count) == K.NONZERO_PADDING
        words[-1] = P ** digit * 66
        assert K.check_words(words, count) == K.NONZERO_PADDING
    words = np.zeros(nw, dtype=np.int32)
    words[-1] = P ** ((count - 1) % 5) * 66        # the last real value: fine
    assert K.check_words(words, count) == K.OK
    assert K.check_words(np.zeros(0, dtype=np.int32), 0) == K.OK


@pytest.mark.parametrize("bits", [3, 26, 63, 64])
@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 13])
def test_decide_packed_against_plain_python(bits, n):
    rng = random.Random(bits * 100 + n)
    count = n * bits
    d0 = [rng.randrange(P) for _ in range(count)]
    d1 = [(P - d + 1 + rng.randrange(P - 1)) % P for d in d0]     # d0 + d1 ≢ 0 anywhere yet
    for row in range(n):      # zeros at the row's first value, last value, or none
        where = row % 3
        if where < 2:
            i = row * bits + (0 if where == 0 else bits - 1)
            d1[i] = (P - d0[i]) % P
    w0 = np.array(_pack_ref(d0), dtype=np.int32)
    w1 = np.array(_pack_ref(d1), dtype=np.int32)
    out = np.zeros(n, dtype=np.bool_)
    out[::2] = True                                   # stale values must be overwritten
    K.decide_packed(w0, w1, n, bits, out)
    want = [any((d0[row * bits + i] + d1[row * bits + i]) % P == 0 for i in range(bits))
            for row in range(n)]
    assert out.tolist() == want
    assert want == [row % 3 < 2 for row in range(n)]


@pytest.mark.parametrize("bits", [3, 26, 63, 64])
@pytest.mark.parametrize("n", [0, 1, 5, 6, 11])
def test_deal_corrections_packed_against_plain_python(bits, n):
    rng = random.Random(bits + 7 * n)
    top = (1 << bits) - 1
    r_u = [rng.choice([0, top, rng.randrange(1 << bits), rng.randrange(1 << 64)])
           for _ in range(n)]        # only the low ``bits`` bits count
    r = np.array([v - (1 << 64) if v >= 1 << 63 else v for v in r_u], dtype=np.int64)
    shares0 = [rng.choice([0, 1, 66, rng.randrange(P)]) for _ in range(n * bits)]
    words = np.full(-(-n * bits // 5), -3, dtype=np.int32)
    K.deal_corrections_packed(r, np.array(shares0, dtype=np.int16), bits, words)
    want = [(b - shares0[row * bits + i]) % P
            for row in range(n) for i, b in enumerate(_msb_bits(r_u[row], bits))]
    assert words.tolist() == _pack_ref(want)


@pytest.mark.parametrize("bits", [1, 2, 15, 16, 17, 23, 31, 32, 33, 63, 64])
def test_pc_message_wide_and_exact_row_paths_agree_with_the_definition(bits):
    """Enough rows that most take the fixed-width path (reading into the next row) and the
    last ones the exact path; special rows and extreme rotations in both."""
    rng = random.Random(bits)
    n = 37
    xbits, r, beta, s, u, shift = _pc_inputs(rng, n, bits)
    top = (1 << bits) - 1
    for row in (1, 9, 30, 36):
        r[row] = top - (1 << 64) if top >= 1 << 63 else top
        beta[row] = 1
    shift[5], shift[35] = bits - 1, bits - 1
    for j in (0, 1):
        words = np.full(-(-n * bits // 5), -7, dtype=np.int32)
        K.pc_message_packed(j, xbits, r, beta, K.join_su(s, u), shift, bits, words)
        assert words.tolist() == _pack_ref(_pc_ref(j, xbits, r, beta, s, u, shift, bits))


@pytest.mark.parametrize("bits", [1, 3, 16, 17, 26, 27, 32, 33, 63, 64])
@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 12, 37])
def test_pc_message_from_packed_shares_equals_the_protocol_definition(bits, n):
    """The message kernel fed the helper's packed words (P1's path: unpacked group by group
    inside the kernel) gives the definition's message for the unpacked shares, on the wide
    rows and on the exact tail, with special rows and extreme rotations."""
    rng = random.Random(7000 + 100 * bits + n)
    xbits, r, beta, s, u, shift = _pc_inputs(rng, n, bits)
    if n > 30:
        top = (1 << bits) - 1
        r[30] = top - (1 << 64) if top >= 1 << 63 else top
        beta[30] = 1
        shift[35] = bits - 1
    xwords = np.array(_pack_ref([int(v) for v in xbits.reshape(-1)]), dtype=np.int32)
    for j in (0, 1):
        words = np.full(-(-n * bits // 5), -7, dtype=np.int32)
        K.pc_message_from_words(j, xwords, r, beta, K.join_su(s, u), shift, bits, words)
        assert words.tolist() == _pack_ref(_pc_ref(j, xbits, r, beta, s, u, shift, bits))


def test_pc_message_from_words_checks_its_arrays():
    xbits, r, beta, s, u, shift = _pc_inputs(random.Random(4), 6, 7)
    nw = -(-6 * 7 // 5)
    xwords = np.zeros(nw, dtype=np.int32)
    words = np.empty(nw, dtype=np.int32)
    with pytest.raises(ValueError, match="xwords"):
        K.pc_message_from_words(1, xwords[:-1], r, beta, K.join_su(s, u), shift, 7, words)
    with pytest.raises(ValueError, match="xwords"):
        K.pc_message_from_words(1, xwords.astype(np.int64), r, beta, K.join_su(s, u), shift,
                                7, words)
    with pytest.raises(ValueError, match="beta"):
        K.pc_message_from_words(1, xwords, r, beta[:5], K.join_su(s, u), shift, 7, words)
    with pytest.raises(ValueError, match="shift"):
        K.pc_message_packed(0, xbits, r, beta, K.join_su(s, u), shift[:5], 7, words)


def test_redraw_words_replaces_and_compacts_the_rejected_positions():
    high = K.SU_HIGH
    limit = (65536 // high) * high
    out = np.full(20, -1, dtype=np.int16)
    bad = np.array([0, 3, 4, 9, 19], dtype=np.int64)
    words = np.array([limit, 5, 65535, high + 7, limit - 1], dtype=np.uint16)
    k = K.redraw_words(words, high, out, bad)
    assert k == 2 and bad[:k].tolist() == [0, 4]
    assert out[[0, 3, 4, 9, 19]].tolist() == [limit % high, 5, 65535 % high, 7,
                                              (limit - 1) % high]
    assert (out[[1, 2, 5]] == -1).all()
    with pytest.raises(ValueError):
        K.redraw_words(words[:4], high, out, bad)
    with pytest.raises(ValueError):
        K.redraw_words(words, high, out[:19], np.array([0, 3, 4, 9, 19], dtype=np.int64))


def test_joint_masks_split_back_exactly():
    """Every value of the joint draw su ∈ [0, 66·67) is one (s, u) pair, s ∈ [1, 66] and
    u ∈ [0, 66], and back (a bijection: uniform su gives independent uniform s and u); the
    message kernel reads the pair it encodes."""
    s = np.repeat(np.arange(1, P, dtype=np.int16), P)
    u = np.tile(np.arange(P, dtype=np.int16), P - 1)
    su = K.join_su(s, u)
    assert K.SU_HIGH == 66 * 67 and sorted(su.tolist()) == list(range(K.SU_HIGH))
    # one row per (s, u) pair, bits = 1: the message is s·c ± u mod 67 with a known c
    n = su.size
    x = np.zeros((n, 1), dtype=np.int16)
    r = np.zeros(n, dtype=np.int64)
    beta = np.zeros(n, dtype=np.int64)
    shift = np.zeros(n, dtype=np.int64)
    for j in (0, 1):
        words = np.empty(-(-n // 5), dtype=np.int32)
        K.pc_message_packed(j, x, r, beta, su.reshape(n, 1), shift, 1, words)
        assert words.tolist() == _pack_ref(_pc_ref(j, x, r, beta, s.reshape(n, 1),
                                                   u.reshape(n, 1), shift, 1))


def test_pc_message_checks_its_arrays():
    xbits, r, beta, s, u, shift = _pc_inputs(random.Random(4), 6, 7)
    words = np.empty(-(-6 * 7 // 5), dtype=np.int32)
    with pytest.raises(ValueError, match="words"):
        K.pc_message_packed(0, xbits, r, beta, K.join_su(s, u), shift, 7, words[:-1])
    with pytest.raises(ValueError, match="C-contiguous"):
        K.pc_message_packed(0, xbits[:, ::-1], r, beta, K.join_su(s, u), shift, 7, words)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.pc_message_packed(0, xbits, r, beta, K.join_su(s, u)[:5], shift, 7, words)


_BOUNDS_SCRIPT = textwrap.dedent("""
    import numpy as np
    from secure_inference.mpc.protocols import compare_kernels as K
    rng = np.random.default_rng(0)
    for bits in (1, 3, 16, 17, 23, 32, 33, 63, 64):
        for n in (0, 1, 4, 5, 6, 7, 11, 12, 13, 40):
            x = rng.integers(0, 67, (n, bits)).astype(np.int16)
            s = rng.integers(1, 67, (n, bits)).astype(np.int16)
            u = rng.integers(0, 67, (n, bits)).astype(np.int16)
            r = rng.integers(0, 2, n).astype(np.int64)
            beta = rng.integers(0, 2, n).astype(np.int64)
            shift = rng.integers(0, bits, n).astype(np.int64)
            nw = -(-n * bits // 5)
            w0, w1 = np.empty(nw, np.int32), np.empty(nw, np.int32)
            K.pc_message_packed(0, x, r, beta, K.join_su(s, u), shift, bits, w0)
            K.pc_message_packed(1, x, r, beta, K.join_su(s, u), shift, bits, w1)
            K.pc_message_from_words(1, w0.copy(), r, beta, K.join_su(s, u), shift, bits, w1)
            assert K.check_words(w0, n * bits) == K.OK
            K.unpack_words(w0, np.empty(n * bits, np.int16))
            K.decide_packed(w0, w1, n, bits, np.empty(n, np.bool_))
            K.deal_corrections_packed(r, x.reshape(-1), bits, w0)
            K.pack_values(x.reshape(-1), w1)
    for size in (0, 1, 63, 64, 65, 1000):
        w = rng.integers(65000, 65536, size).astype(np.uint16)
        K.sample_words(w, 67, np.empty(size, np.int16), np.empty(size, np.int64))
        K.redraw_words(w, 67, np.empty(size + 1, np.int16), np.arange(size, dtype=np.int64))
    import torch
    from secure_inference.mpc.protocols import drelu_kernels as DK
    for n in (0, 1, 7):
        x = torch.from_numpy(rng.integers(-2**62, 2**62, n))
        for bits, k in ((1, 0), (27, 3), (64, 0), (40, 24)):
            a = DK.mask_input(x, x.clone(), bits, k)
            nb = (bits + 7) // 8
            DK.combine_opened(a, torch.zeros(n * nb, dtype=torch.uint8), bits, x & 1)
        DK.drelu_output(1, x & 1, x)
        DK.mul_output(x & 1, x, x, x, x, None)
        if n:
            DK.mul_output(x & 1, x, x[:1].repeat(9), x[:1].repeat(9), x[:1].repeat(9),
                          torch.from_numpy(rng.integers(0, n, 9)))
    print("in bounds")
""")


@pytest.mark.processes
def test_kernels_stay_in_bounds(tmp_path):
    """Every kernel, compiled afresh with numba's bounds checking on, at widths and row counts
    around the wide-row and group edges: an index past an array raises there (a read past the
    end would otherwise give garbage that the value tests cannot see)."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", _BOUNDS_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in bounds" in proc.stdout


@pytest.mark.parametrize("bits", [3, 26])
def test_helper_kernels_across_their_row_blocks(bits):
    """More rows than one block of the helper's kernels (decision and corrections)."""
    rng = random.Random(bits)
    n = 2 * K._DECIDE_ROWS + 61
    count = n * bits
    d0 = [rng.randrange(P) for _ in range(count)]
    d1 = [(P - d + 1 + rng.randrange(P - 1)) % P for d in d0]
    for row in range(0, n, 7):
        i = row * bits + rng.randrange(bits)
        d1[i] = (P - d0[i]) % P
    out = np.empty(n, dtype=np.bool_)
    K.decide_packed(np.array(_pack_ref(d0), dtype=np.int32),
                    np.array(_pack_ref(d1), dtype=np.int32), n, bits, out)
    assert out.tolist() == [row % 7 == 0 for row in range(n)]
    r_u = [rng.randrange(1 << 64) for _ in range(n)]
    r = np.array([v - (1 << 64) if v >= 1 << 63 else v for v in r_u], dtype=np.int64)
    words = np.empty(-(-count // 5), dtype=np.int32)
    K.deal_corrections_packed(r, np.array(d0, dtype=np.int16), bits, words)
    want = [(b - d0[row * bits + i]) % P
            for row in range(n) for i, b in enumerate(_msb_bits(r_u[row], bits))]
    assert words.tolist() == _pack_ref(want)
