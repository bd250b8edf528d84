"""Exact mod-2^64 convolution/matmul backends against Python-integer references."""
import pytest
import torch

from secure_inference.mpc import prg
from secure_inference.mpc.backends import (CpuInt64Backend, ExactnessError, LimbFloatBackend,
                                           check_exact, get_backend, limb_bits_for)

M64 = 1 << 64


def signed(v: int) -> int:
    v %= M64
    return v - M64 if v >= 1 << 63 else v


def rand64(*shape) -> torch.Tensor:
    return prg.private_stream().ring(shape)


def conv2d_python(x, w, stride, padding, dilation, groups):
    """Direct definition of conv2d with Python integers, reduced mod 2^64."""
    xs, ws = x.tolist(), w.tolist()
    n, cin, h, wd = x.shape
    cout, cpg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    opg = cout // groups
    out = [[[[0] * ow for _ in range(oh)] for _ in range(cout)] for _ in range(n)]
    for b in range(n):
        for o in range(cout):
            g = o // opg
            for i in range(oh):
                for j in range(ow):
                    acc = 0
                    for c in range(cpg):
                        for u in range(kh):
                            for v in range(kw):
                                yy, xx = i * sh - ph + u * dh, j * sw - pw + v * dw
                                if 0 <= yy < h and 0 <= xx < wd:
                                    acc += xs[b][g * cpg + c][yy][xx] * ws[o][c][u][v]
                    out[b][o][i][j] = signed(acc)
    return torch.tensor(out, dtype=torch.int64)


CONV_CASES = [  # (N, Cin, H, W, Cout, k, stride, padding, dilation, groups)
    (1, 3, 6, 5, 4, 3, (1, 1), (1, 1), (1, 1), 1),
    (2, 4, 7, 7, 4, 3, (2, 2), (1, 0), (1, 1), 2),
    (1, 4, 6, 6, 4, 3, (1, 2), (2, 2), (2, 1), 4),    # depthwise, dilated
    (1, 2, 5, 5, 6, 1, (1, 1), (0, 0), (1, 1), 1),    # 1x1
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_cpu_int64_conv2d_matches_python_integers(case):
    n, cin, h, w_, cout, k, s, p, d, g = case
    x, w = rand64(n, cin, h, w_), rand64(cout, cin // g, k, k)
    got = CpuInt64Backend().conv2d(x, w, s, p, d, g)
    assert torch.equal(got, conv2d_python(x, w, s, p, d, g))


def test_cpu_int64_matmul_matches_python_integers():
    x, y = rand64(5, 13), rand64(13, 7)
    ref = [[signed(sum(a * b for a, b in zip(row, col))) for col in zip(*y.tolist())]
           for row in x.tolist()]
    assert torch.equal(CpuInt64Backend().matmul(x, y), torch.tensor(ref, dtype=torch.int64))


@pytest.mark.parametrize("case", CONV_CASES)
def test_limb_backend_conv2d_exact_on_cpu(case):
    n, cin, h, w_, cout, k, s, p, d, g = case
    x, w = rand64(n, cin, h, w_), rand64(cout, cin // g, k, k)
    ref = CpuInt64Backend().conv2d(x, w, s, p, d, g)
    assert torch.equal(LimbFloatBackend(torch.float64).conv2d(x, w, s, p, d, g), ref)
    # narrow limbs make float32 exact too (reduction here is at most 36)
    assert torch.equal(LimbFloatBackend(torch.float32).conv2d(x, w, s, p, d, g), ref)


def test_limb_backend_matmul_exact_on_cpu_with_batches():
    x, y = rand64(3, 4, 300), rand64(300, 5)
    assert torch.equal(LimbFloatBackend().matmul(x, y), torch.matmul(x, y))
    x1 = rand64(300)
    assert torch.equal(LimbFloatBackend().matmul(x1, y), torch.matmul(x1, y))


def test_limb_width_follows_the_exactness_bound():
    for k, dtype in ((1, torch.float64), (9, torch.float64), (4608, torch.float64),
                     (2 ** 20, torch.float64), (9, torch.float32), (300, torch.float32)):
        b = limb_bits_for(k, dtype)
        mant = 53 if dtype == torch.float64 else 24
        assert k * (2 ** b - 1) ** 2 < 2 ** mant <= k * (2 ** (b + 1) - 1) ** 2
    check_exact(4608, 20, torch.float64)
    with pytest.raises(ExactnessError):
        check_exact(4608, 21, torch.float64)
    with pytest.raises(ExactnessError):  # a forced limb width that would round is refused
        LimbFloatBackend(torch.float32, limb_bits=12).conv2d(rand64(1, 8, 4, 4),
                                                              rand64(2, 8, 3, 3))


def test_backends_propagate_shapes_of_meta_tensors():
    x = torch.empty(2, 4, 8, 8, dtype=torch.int64, device="meta")
    w = torch.empty(6, 2, 3, 3, dtype=torch.int64, device="meta")
    for be in (CpuInt64Backend(), LimbFloatBackend()):
        assert be.conv2d(x, w, 2, 1, 1, 2).shape == (2, 6, 4, 4)
    with pytest.raises(TypeError):
        CpuInt64Backend().matmul(torch.ones(2, 2), torch.ones(2, 2))
    assert isinstance(get_backend("cpu"), CpuInt64Backend)
    assert isinstance(get_backend("cuda"), LimbFloatBackend)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CONV_CASES + [(2, 64, 16, 16, 64, 3, (1, 1), (1, 1), (1, 1), 1)])
def test_cuda_limb_conv2d_matches_cpu_int64(case):
    n, cin, h, w_, cout, k, s, p, d, g = case
    x, w = rand64(n, cin, h, w_), rand64(cout, cin // g, k, k)
    ref = CpuInt64Backend().conv2d(x, w, s, p, d, g)
    got = get_backend("cuda").conv2d(x.cuda(), w.cuda(), s, p, d, g)
    assert torch.equal(got.cpu(), ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_limb_matmul_matches_cpu_int64():
    x, y = rand64(64, 4096), rand64(4096, 32)
    assert torch.equal(get_backend("cuda").matmul(x.cuda(), y.cuda()).cpu(), torch.matmul(x, y))


# ------------------------------------------------------------------ CPU balanced limbs

_LO, _HI = -(1 << 63), (1 << 63) - 1


def test_balanced_limbs_reconstruct_and_stay_in_range():
    from secure_inference.mpc.backends import balanced_limbs
    v = torch.cat([torch.tensor([_LO, _HI, -1, 0, 1, (1 << 21), -(1 << 21), (1 << 21) - 1,
                                 (1 << 43) + (1 << 21)]),
                   torch.randint(_LO, _HI, (2000,))])
    d = balanced_limbs(v, 22, 3)
    back = d[0] + (d[1] << 22) + (d[2] << 44)          # int64 arithmetic wraps mod 2^64
    assert torch.equal(back, v)
    for digit in d[:2]:
        assert int(digit.min()) >= -(1 << 21) and int(digit.max()) < (1 << 21)
    assert int(d[2].abs().max()) <= (1 << 19)          # what is left of 64 − 44 bits


@pytest.mark.parametrize("xs,ws,geom", [
    ((2, 8, 9, 9), (6, 8, 3, 3), (1, 1, 1)),
    ((1, 300, 10, 10), (5, 300, 3, 3), (1, 1, 1)),      # K = 2700: split over input channels
    ((1, 8, 20, 18), (8, 8, 3, 3), (2, 2, 2)),
    ((1, 16, 12, 12), (4, 16, 1, 1), (1, 0, 1)),
    ((1, 8, 4, 4), (8, 8, 3, 3), (1, 1, 1)),             # small output: int64 kernel
])
def test_cpu_hybrid_conv_is_exact_for_random_and_small_weights(xs, ws, geom):
    """Random 64-bit weights and small plaintext weights up to the 2^21 bound (declared small
    or not; one weight of 2^21 is not small) all equal the int64 kernel, on both paths."""
    from secure_inference.mpc.backends import CpuHybridBackend
    fast, base = CpuHybridBackend(), CpuInt64Backend()
    x = torch.randint(_LO, _HI, xs)
    x.view(-1)[:4] = torch.tensor([_LO, _HI, -1, 0])
    bound = 1 << 21
    small = torch.randint(-bound + 1, bound, ws)
    small.view(-1)[:2] = torch.tensor([bound - 1, -bound + 1])
    edge = small.clone()
    edge.view(-1)[0] = bound
    big = torch.randint(_LO, _HI, ws)
    big.view(-1)[:4] = torch.tensor([_HI, _LO, 0, -1])
    for w in (small, edge, big):
        assert torch.equal(fast.conv2d(x, w, *geom), base.conv2d(x, w, *geom))
    assert torch.equal(fast.conv2d(x, small, *geom, small_weight=True), base.conv2d(x, small, *geom))
    from secure_inference.mpc.backends import fits_small
    assert fits_small(small) and not fits_small(edge)


def _kernel_calls(backend, x, w, geom=(1, 1, 1), **kw) -> list[tuple[str, torch.dtype]]:
    """The torch kernels (conv2d or mm, and their dtypes) one ring convolution runs."""
    calls = []
    real_conv, real_mm = torch.nn.functional.conv2d, torch.mm

    def conv(inp, *args, **kwargs):
        calls.append(("conv2d", inp.dtype))
        return real_conv(inp, *args, **kwargs)

    def mm(a, *args, **kwargs):
        calls.append(("mm", a.dtype))
        return real_mm(a, *args, **kwargs)
    torch.nn.functional.conv2d, torch.mm = conv, mm
    try:
        backend.conv2d(x, w, *geom, **kw)
    finally:
        torch.nn.functional.conv2d, torch.mm = real_conv, real_mm
    return calls


@pytest.mark.parametrize("xs", [(1, 8, 12, 12), (1, 8, 4, 4)])   # conv path, gemm path
def test_cpu_hybrid_path_never_depends_on_the_weights_values(xs):
    """The server's per-layer timings reach the client: a path chosen from the values of W
    would tell it something about them. The kernels follow only the public shapes (and the
    caller's declaration, which is checked)."""
    from secure_inference.mpc.backends import CpuHybridBackend
    fast = CpuHybridBackend()
    x = torch.randint(_LO, _HI, xs)
    small = torch.randint(-100, 100, (4, 8, 3, 3))
    large = small.clone()
    large.view(-1)[0] = 1 << 30
    calls = _kernel_calls(fast, x, small)
    assert calls == _kernel_calls(fast, x, large) == _kernel_calls(fast, x, small,
                                                                   small_weight=True)
    assert calls == [("conv2d", torch.int64)] if xs[2] == 12 else [("mm", torch.int64)]
    with pytest.raises(ValueError, match="not"):
        fast.conv2d(x, large, 1, 1, 1, small_weight=True)


def test_server_refuses_weights_beyond_the_public_bound_when_opening_them():
    from secure_inference.mpc import protocols as P
    from secure_inference.mpc.harness import run_in_process
    w = torch.full((2, 1, 3, 3), 0.25, dtype=torch.float64)
    w[0, 0, 0, 0] = 40.0             # 40 · 2^16 > 2^21

    def fn(party):
        P.open_weights(party, w if party.role == 1 else None, weight_shape=w.shape, name="conv")
    with pytest.raises(ValueError, match="layer 'conv' has a weight of magnitude 40.*--frac-bits"):
        run_in_process(fn, timeout=10)
    w[0, 0, 0, 0] = 31.0             # below 2^21 / 2^16 = 32: fine
    run_in_process(fn, timeout=10)


def test_cpu_hybrid_conv_worst_case_sums_stay_exact():
    """Every digit at its largest odd magnitude and an odd reduction of 301·9 = 2709 products:
    an unsplit float64 sum would reach 2^53.4 with its lowest bit set and round; the channel
    split keeps every partial sum exact."""
    from secure_inference.mpc.backends import CpuHybridBackend, balanced_limbs
    d = -(1 << 21) + 1
    v = (d + (d << 22) + (1 << 44)) % (1 << 64)
    v = v - (1 << 64) if v >= 1 << 63 else v
    assert [int(t) for t in balanced_limbs(torch.tensor([v]), 22, 3)] == [d, d, 1]
    x = torch.full((1, 301, 10, 10), v, dtype=torch.int64)
    fast, base = CpuHybridBackend(), CpuInt64Backend()
    for w in (torch.full((2, 301, 3, 3), v, dtype=torch.int64),
              torch.full((2, 301, 3, 3), -(1 << 21) + 1, dtype=torch.int64)):
        assert torch.equal(fast.conv2d(x, w, 1, 1, 1), base.conv2d(x, w, 1, 1, 1))


# ------------------------------------------------------------------ CPU int64 paths (issue 21)

def _edge(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the ring's edge values at its first elements."""
    t = t.clone()
    vals = torch.tensor([_LO, _HI, 0, -1, _LO, _HI, 1, _LO + 1])
    t.view(-1)[:len(vals)] = vals[:t.numel()]
    return t


GEMM_CASES = [  # (N, Cin, H, W, Cout, (kh, kw), stride, padding, dilation, groups)
    (1, 5, 6, 5, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1),     # 6x5 output: gemm
    (2, 4, 7, 7, 6, (3, 3), (2, 2), (1, 0), (1, 1), 1),     # batch 2, asymmetric padding
    (1, 3, 9, 8, 4, (3, 2), (1, 2), (2, 1), (2, 1), 1),     # dilated, asymmetric kernel
    (1, 6, 5, 5, 2, (1, 1), (2, 2), (0, 0), (1, 1), 1),     # 1x1 stride 2 (downsample)
    (1, 4, 4, 4, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),     # 4x4, the ResNet18 layer4 maps
    (1, 2, 3, 3, 3, (3, 3), (1, 1), (3, 3), (2, 2), 1),     # padding larger than the input
    (1, 4, 12, 12, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),   # 144 pixels: conv path
    (1, 4, 6, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2),     # grouped: conv path
]


@pytest.mark.parametrize("case", GEMM_CASES)
def test_cpu_hybrid_conv_paths_match_python_integers(case):
    """Both int64 paths (im2col + matmul, torch's conv2d) against the plain definition in
    Python integers mod 2^64, on uniform 64-bit operands with the edge values −2^63, 2^63 − 1,
    0, −1 in both, and with small weights declared small."""
    from secure_inference.mpc.backends import CpuHybridBackend
    n, cin, h, w_, cout, k, s, p, d, g = case
    fast = CpuHybridBackend()
    x = _edge(rand64(n, cin, h, w_))
    w = _edge(rand64(cout, cin // g, *k))
    ref = conv2d_python(x, w, s, p, d, g)
    got = fast.conv2d(x, w, s, p, d, g)
    assert got.dtype == torch.int64 and got.is_contiguous()
    assert torch.equal(got, ref)
    small = torch.randint(-(1 << 21) + 1, 1 << 21, w.shape)
    small.view(-1)[:2] = torch.tensor([(1 << 21) - 1, -(1 << 21) + 1])
    assert torch.equal(fast.conv2d(x, small, s, p, d, g, small_weight=True),
                       conv2d_python(x, small, s, p, d, g))
    # the same exact result on the other path (and torch's own int64 conv2d agrees)
    assert torch.equal(CpuInt64Backend().conv2d(x, w, s, p, d, g), ref)
    if g == 1:
        assert torch.equal(fast._gemm_conv(x, w, s, p, d), ref)


def test_cpu_hybrid_gemm_path_is_taken_for_small_maps_only():
    from secure_inference.mpc.backends import CpuHybridBackend
    fast = CpuHybridBackend()
    assert fast.conv_path((1, 512, 4, 4), (512, 512, 3, 3), 1, 1) == "gemm"
    assert fast.conv_path((1, 256, 8, 8), (512, 256, 1, 1), 2, 0) == "gemm"
    assert fast.conv_path((1, 256, 8, 8), (256, 256, 3, 3), 1, 1) == "conv"
    assert fast.conv_path((1, 64, 32, 32), (64, 64, 3, 3), 1, 1) == "conv"
    assert fast.conv_path((1, 8, 4, 4), (8, 2, 3, 3), 1, 1, 1, 4) == "conv"   # grouped


def test_im2col_matches_unfold_and_refuses_kernels_larger_than_the_input():
    from secure_inference.mpc.backends import im2col
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    for k, s, p, d in [((3, 3), 1, 1, 1), ((2, 3), (2, 1), (1, 2), (2, 1)), ((1, 1), 2, 0, 1)]:
        cols, oh, ow = im2col(x, k, s, p, d)
        ref = torch.nn.functional.unfold(x, k, dilation=d, padding=p, stride=s)  # [N, K, P]
        assert torch.equal(cols, ref.transpose(1, 2).reshape(-1, ref.shape[1]))
        assert oh * ow == ref.shape[2]
    with pytest.raises(ValueError, match="does not fit"):
        im2col(x, (9, 3))


def test_cpu_hybrid_transposed_weights_follow_in_place_changes_and_new_tensors():
    """The cached Wᵀ is keyed by the tensor and its version: an in-place change of the same
    tensor, or another tensor (possibly at a reused address), is never served a stale copy."""
    from secure_inference.mpc.backends import CpuHybridBackend
    fast = CpuHybridBackend()
    x = _edge(rand64(1, 4, 4, 4))
    w = _edge(rand64(3, 4, 3, 3))
    assert torch.equal(fast.conv2d(x, w, 1, 1), conv2d_python(x, w, (1, 1), (1, 1), (1, 1), 1))
    w.add_(12345)
    assert torch.equal(fast.conv2d(x, w, 1, 1), conv2d_python(x, w, (1, 1), (1, 1), (1, 1), 1))
    for _ in range(3):   # fresh tensors, whose ids may repeat once the old ones are freed
        v = rand64(3, 4, 3, 3)
        assert torch.equal(fast.conv2d(x, v, 1, 1), conv2d_python(x, v, (1, 1), (1, 1), (1, 1), 1))
        del v
    del w
    import gc
    gc.collect()
    assert len(fast._transposed) == 0   # entries go with their tensors


def test_cpu_hybrid_gemm_path_at_resnet18_layer4_shape_equals_the_int64_conv():
    """The real layer4 shape (512 → 512, 3x3, 4x4 maps; K = 4608 products per output) on the
    matrix-product path, with worst-case operands (every element −2^63 or 2^63 − 1, so every
    product and partial sum wraps), against torch's int64 conv2d and one output element in
    Python integers."""
    from secure_inference.mpc.backends import CpuHybridBackend
    fast = CpuHybridBackend()
    x = torch.where(torch.rand(1, 512, 4, 4) < 0.5, _LO, _HI)
    w = _edge(rand64(8, 512, 3, 3))
    got = fast.conv2d(x, w, 1, 1)
    assert torch.equal(got, CpuInt64Backend().conv2d(x, w, 1, 1))
    acc = sum(int(x[0, c, i, j]) * int(w[5, c, i + 1, j + 1])
              for c in range(512) for i in range(0, 2) for j in range(0, 2))   # pixel (0, 0)
    assert int(got[0, 5, 0, 0]) == signed(acc)


def test_prepare_conv_does_the_per_tensor_work_in_the_set_up(monkeypatch):
    from secure_inference.mpc import backends as B
    be = B.CpuHybridBackend()
    torch.manual_seed(0)
    w = torch.randint(-2 ** 20, 2 ** 20, (8, 4, 3, 3))
    x = torch.randint(-2 ** 62, 2 ** 62, (1, 4, 4, 4))          # 4x4 output: the gemm path
    assert be.conv_path(x.shape, w.shape, 1, 1) == "gemm"
    be.prepare_conv(w, x.shape, 1, 1, small_weight=True)
    assert id(w) in be._transposed and id(w) in be._small_seen
    # the first convolution then scans and transposes nothing
    wt = be._transposed[id(w)][2]
    ref = torch.nn.functional.conv2d(x, w, None, 1, 1)
    monkeypatch.setattr(B, "fits_small", lambda t: pytest.fail("rescanned the weights"))
    assert torch.equal(be.conv2d(x, w, 1, 1, small_weight=True), ref)
    assert be._transposed[id(w)][2] is wt
    monkeypatch.undo()
    big = torch.full((8, 4, 3, 3), 2 ** 30)
    with pytest.raises(ValueError, match="below 2"):
        B.CpuHybridBackend().prepare_conv(big, x.shape, 1, 1, small_weight=True)
    conv = B.CpuHybridBackend()                          # the conv path keeps no transposed copy
    conv.prepare_conv(w, (1, 4, 16, 16), 1, 1)
    assert id(w) not in conv._transposed
