"""The Triton kernel of :mod:`.chacha_triton` (imported only where it can run, so that CPU
parties never import Triton).

One program keeps ``BLOCKS`` ChaCha20 states in registers for all 20 rounds and writes each
keystream word once; unsigned 32-bit words (wrapping additions, logical shifts) give exactly
RFC 8439's block function.
"""
import triton
import triton.language as tl

__all__ = ["chacha20_kernel"]


@triton.jit
def _rotl(x, n: tl.constexpr):
    return (x << n) | (x >> (32 - n))


@triton.jit
def _quarter(a, b, c, d):
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


@triton.jit
def chacha20_kernel(params_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    """``out[16 * i + j]`` = word j of keystream block ``first + i``; ``params``: 8 key
    words, the first block counter, 3 nonce words (int64 holding uint32 values)."""
    pid = tl.program_id(0).to(tl.int64)   # pid * BLOCKS overflows int32 beyond 2^31 blocks
    idx = pid * BLOCKS + tl.arange(0, BLOCKS)
    live = idx < n_blocks
    zero = tl.zeros([BLOCKS], dtype=tl.uint32)
    # "expand 32-byte k" as little-endian words
    c0 = zero + 0x61707865
    c1 = zero + 0x3320646E
    c2 = zero + 0x79622D32
    c3 = zero + 0x6B206574
    k0 = zero + tl.load(params_ptr + 0).to(tl.uint32)
    k1 = zero + tl.load(params_ptr + 1).to(tl.uint32)
    k2 = zero + tl.load(params_ptr + 2).to(tl.uint32)
    k3 = zero + tl.load(params_ptr + 3).to(tl.uint32)
    k4 = zero + tl.load(params_ptr + 4).to(tl.uint32)
    k5 = zero + tl.load(params_ptr + 5).to(tl.uint32)
    k6 = zero + tl.load(params_ptr + 6).to(tl.uint32)
    k7 = zero + tl.load(params_ptr + 7).to(tl.uint32)
    ctr = (tl.load(params_ptr + 8) + idx.to(tl.int64)).to(tl.uint32)
    n0 = zero + tl.load(params_ptr + 9).to(tl.uint32)
    n1 = zero + tl.load(params_ptr + 10).to(tl.uint32)
    n2 = zero + tl.load(params_ptr + 11).to(tl.uint32)
    x0, x1, x2, x3 = c0, c1, c2, c3
    x4, x5, x6, x7 = k0, k1, k2, k3
    x8, x9, x10, x11 = k4, k5, k6, k7
    x12, x13, x14, x15 = ctr, n0, n1, n2
    for _ in range(10):
        x0, x4, x8, x12 = _quarter(x0, x4, x8, x12)
        x1, x5, x9, x13 = _quarter(x1, x5, x9, x13)
        x2, x6, x10, x14 = _quarter(x2, x6, x10, x14)
        x3, x7, x11, x15 = _quarter(x3, x7, x11, x15)
        x0, x5, x10, x15 = _quarter(x0, x5, x10, x15)
        x1, x6, x11, x12 = _quarter(x1, x6, x11, x12)
        x2, x7, x8, x13 = _quarter(x2, x7, x8, x13)
        x3, x4, x9, x14 = _quarter(x3, x4, x9, x14)
    base = out_ptr + idx.to(tl.int64) * 16
    tl.store(base + 0, (x0 + c0).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 1, (x1 + c1).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 2, (x2 + c2).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 3, (x3 + c3).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 4, (x4 + k0).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 5, (x5 + k1).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 6, (x6 + k2).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 7, (x7 + k3).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 8, (x8 + k4).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 9, (x9 + k5).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 10, (x10 + k6).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 11, (x11 + k7).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 12, (x12 + ctr).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 13, (x13 + n0).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 14, (x14 + n1).to(tl.int32, bitcast=True), mask=live)
    tl.store(base + 15, (x15 + n2).to(tl.int32, bitcast=True), mask=live)
