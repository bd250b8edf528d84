"""Linear and pooling protocols against plaintext, with exact byte and round counts."""
import functools

import pytest
import torch
import torch.nn.functional as F

from secure_inference.mpc import prg
from secure_inference.mpc import protocols as P
from secure_inference.mpc.ring import decode, encode
from secure_inference.mpc.stats import merge_stats
from secure_inference.mpc.harness import run_in_process

FRAC = 16
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
EDGES = torch.tensor([0, 1, -1, 2, I64_MAX, I64_MIN, I64_MAX - 1, I64_MIN + 1, 1 << 32, -(1 << 32)])


def rand64(*shape) -> torch.Tensor:
    return prg.private_stream().ring(shape)


def server_weights(*shape) -> torch.Tensor:
    """Encoded server weights: any ring value the server accepts (|w| < 2^21), both bounds
    included."""
    bound = (1 << 21) - 1
    w = torch.randint(-bound, bound + 1, shape)
    w.view(-1)[:2] = torch.tensor([bound, -bound])[:w.numel()]
    return w


def with_edges(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1).clone()
    k = min(flat.numel(), EDGES.numel())
    flat[:k] = EDGES[:k]
    return flat.reshape(x.shape)


def _inputs(p, x, y=None, x_owner=0, y_owner=1):
    xs = P.share(p, x if p.role == x_owner else None, x_owner, x.shape)
    if y is None:
        return xs
    ys = P.share(p, y if p.role == y_owner else None, y_owner, y.shape)
    return xs, ys


def _open(p, t):
    return P.reconstruct(p, t, to=0)


def stats_of(results, scope):
    return merge_stats([r[-1] for r in results], scope)


# --- share / reconstruct -----------------------------------------------------------------

def _share_roundtrip(p, x):
    out = []
    for owner in (0, 1, 2):
        s = P.share(p, x if p.role == owner else None, owner, x.shape, scope=f"share{owner}")
        out.append(P.reconstruct(p, s, to=(0, 1, 2), scope=f"open{owner}"))
    s = P.share(p, x if p.role == 0 else None, 0, x.shape, scope="share-again")
    out.append(P.reconstruct(p, s, to=1, scope="open-to-1"))
    return out, s, p.stats


def test_share_and_reconstruct_every_owner_and_recipient():
    x = with_edges(rand64(3, 50))
    res = run_in_process(functools.partial(_share_roundtrip, x=x))
    for role in (0, 1, 2):
        for opened in res[role][0][:3]:
            assert torch.equal(opened, x)
    assert res[0][0][3] is None and res[2][0][3] is None and torch.equal(res[1][0][3], x)
    assert res[2][1].is_meta  # the helper holds a shape-only placeholder
    n = x.numel()
    for owner in (0, 1):  # shares of P0/P1 inputs cost nothing
        assert stats_of(res, f"share{owner}") == {"bytes": 0, "frames": 0, "rounds": 0}
    s2 = stats_of(res, "share2")
    assert s2["bytes"] == 8 * n and s2["bytes_2->1"] == 8 * n and s2["rounds"] == 1
    o = stats_of(res, "open0")   # to all three: P0<->P1 both ways and both to P2
    assert o["bytes"] == 4 * 8 * n and o["rounds"] == 1
    assert stats_of(res, "open-to-1")["bytes"] == 8 * n


# --- Beaver products -----------------------------------------------------------------------

def _ring_products(p, x, y, bits, vals, a, b):
    xs, ys = _inputs(p, x, y)
    bs = P.share(p, bits if p.role == 0 else None, 0, bits.shape, scope="bits")
    vs = P.share(p, vals if p.role == 1 else None, 1, vals.shape, scope="vals")
    as_, bs_ = _inputs(p, a, b, x_owner=1, y_owner=0)
    m = P.mul(p, xs, ys, truncate=False)
    bm = P.mul(p, bs, vs, truncate=False, scope="bcast")
    mm = P.matmul(p, as_, bs_, truncate=False)
    return [_open(p, t) for t in (m, bm, mm)], p.stats


def test_beaver_products_are_exact_mod_2_64():
    x, y = with_edges(rand64(4, 33)), with_edges(rand64(4, 33)).flip(1)
    # Block-ReLU style broadcast: one bit per 3x3 patch times its pixels
    bits = prg.private_stream().below((2, 3, 2, 1, 2, 1), 2)
    vals = rand64(2, 3, 2, 3, 2, 3)
    a, b = rand64(2, 5, 17), rand64(17, 6)
    res = run_in_process(functools.partial(_ring_products, x=x, y=y, bits=bits, vals=vals,
                                           a=a, b=b))
    m, bm, mm = res[0][0]
    assert torch.equal(m, x * y)
    assert torch.equal(bm, bits * vals)
    assert torch.equal(mm, torch.matmul(a, b))
    # bytes: c1 from P2 (8 per output) + E, F each way (8 per element of x and y, per direction)
    st = stats_of(res, "mul")
    assert st["bytes"] == 8 * x.numel() + 2 * 8 * (x.numel() + y.numel())
    assert st["bytes_2->1"] == 8 * x.numel() and st["rounds"] == 1
    sb = stats_of(res, "bcast")  # E opened at patch size only
    assert sb["bytes"] == 8 * vals.numel() + 2 * 8 * (bits.numel() + vals.numel())
    sm = stats_of(res, "matmul")
    assert sm["bytes"] == 8 * 2 * 5 * 6 + 2 * 8 * (a.numel() + b.numel()) and sm["rounds"] == 1


def _fixed_mul(p, x, y):
    xs, ys = _inputs(p, encode(x, FRAC), encode(y, FRAC))
    return _open(p, P.mul(p, xs, ys)), _open(p, P.matmul(p, xs, ys.transpose(0, 1))), p.stats


def test_fixed_point_mul_with_truncation():
    # edge values keep |x·y| < 2^10: truncation then fails with probability < 2^-21 per element
    # (ring.py); larger products fail measurably often (e.g. 1000·1000: 2^-11), by design
    x = torch.cat([torch.randn(500) * 20, torch.tensor([0.0, 1.0, -1.0, 30.0, -30.0])])
    y = torch.cat([torch.randn(500), torch.tensor([5.0, -5.0, 0.0, 0.001, -30.0])])
    x, y = x.reshape(5, 101), y.reshape(5, 101)
    res = run_in_process(functools.partial(_fixed_mul, x=x, y=y))
    xe, ye = encode(x, FRAC), encode(y, FRAC)
    exact = torch.div(xe * ye, 1 << FRAC, rounding_mode="floor")
    assert int((res[0][0] - exact).abs().max()) <= 1          # ±1 LSB of truncation
    assert torch.allclose(decode(res[0][1], FRAC), (x.double() @ y.double().T), atol=1e-2)


# --- server-weight layers -----------------------------------------------------------------

CONV_CASES = [  # (N, Cin, H, W, Cout, k, stride, padding, dilation, groups)
    (2, 3, 8, 8, 4, 3, 1, 1, 1, 1),
    (1, 4, 9, 7, 6, 3, 2, (1, 0), 1, 2),
    (1, 6, 8, 8, 6, 3, 1, 2, 2, 6),     # depthwise, dilated
    (2, 8, 5, 5, 3, 1, 1, 0, 1, 1),     # 1x1
]


def _conv_ring(p, x, w, cfg, name):
    xs = _inputs(p, x)
    n, cin, h, w_, cout, k, s, pad, d, g = cfg
    out = P.conv2d(p, xs, w if p.role == 1 else None, None, weight_shape=w.shape, stride=s,
                   padding=pad, dilation=d, groups=g, name=name, truncate=False)
    return _open(p, out), p.stats


@pytest.mark.parametrize("cfg", CONV_CASES)
def test_conv2d_with_server_weights_exact_mod_2_64(cfg):
    n, cin, h, w_, cout, k, s, pad, d, g = cfg
    x, w = with_edges(rand64(n, cin, h, w_)), server_weights(cout, cin // g, k, k)
    res = run_in_process(functools.partial(_conv_ring, x=x, w=w, cfg=cfg, name="conv"))
    ref = F.conv2d(x, w, None, s, pad, d, g)
    assert torch.equal(res[0][0], ref)
    st = stats_of(res, "conv")
    assert st["bytes_1->0"] == 8 * w.numel()                    # F opened once
    assert st["bytes_0->1"] == 8 * x.numel()                    # E = x0 - A
    assert st["bytes_2->1"] == 8 * ref.numel()                  # c1
    assert st["bytes"] == 8 * (w.numel() + x.numel() + ref.numel()) and st["rounds"] == 1


def _preprocessed_layers(p, x, w, b, lw, lb):
    """conv2d then linear with their input-independent halves preprocessed first."""
    P.open_weights(p, w if p.role == 1 else None, weight_shape=w.shape, name="conv")
    P.open_weights(p, lw if p.role == 1 else None, weight_shape=lw.shape, name="fc")
    conv_out = (x.shape[0], w.shape[0]) + x.shape[2:]
    pre = P.preprocess(p, [("conv", x.shape, w.shape, P.conv_op(p, 1, 1, 1, 1)),
                           ("fc", (x.shape[0], lw.shape[1]), lw.shape, P.linear_op(p))])
    xs = _inputs(p, encode(x, FRAC))
    with p.scope("online"):
        y = P.conv2d(p, xs, w if p.role == 1 else None, b if p.role == 1 else None,
                     weight_shape=w.shape, stride=1, padding=1, name="conv", pre=pre["conv"])
        assert tuple(y.shape) == conv_out
        z = P.linear(p, y.reshape(y.shape[0], -1), lw if p.role == 1 else None,
                     lb if p.role == 1 else None, weight_shape=lw.shape, name="fc",
                     pre=pre["fc"])
        if p.role != 2:  # a preprocessed layer refuses an input of another shape
            with pytest.raises(ValueError, match="another input shape"):
                P.conv2d(p, xs[:, :, :4], w if p.role == 1 else None, None,
                         weight_shape=w.shape, padding=1, name="conv", pre=pre["conv"])
    return _open(p, y), _open(p, z), p.stats


def test_preprocessed_conv_and_linear_match_plaintext_with_exact_costs():
    """Preprocessing moves the helper's correction (8·|out| bytes, one round for all layers)
    before the input; online each layer is E alone (8·|x| bytes, P0 → P1)."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 6, 6)
    w, b = torch.randn(4, 3, 3, 3) * 0.3, torch.randn(4)
    lw, lb = torch.randn(5, 4 * 36) * 0.1, torch.randn(5)
    res = run_in_process(functools.partial(_preprocessed_layers, x=x, w=w, b=b, lw=lw, lb=lb))
    y_ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert torch.allclose(decode(res[0][0], FRAC), y_ref, atol=2e-3)
    z_ref = F.linear(y_ref.reshape(2, -1), lw.double(), lb.double())
    assert torch.allclose(decode(res[0][1], FRAC), z_ref, atol=2e-2)
    stats = [r[-1] for r in res]
    pre = merge_stats(stats, "preprocess")
    assert pre["bytes"] == pre["bytes_2->1"] == 8 * (y_ref.numel() + z_ref.numel())
    assert pre["rounds"] == 1
    conv, fc = merge_stats(stats, "online/conv"), merge_stats(stats, "online/fc")
    assert conv["bytes"] == conv["bytes_0->1"] == 8 * x.numel() and conv["rounds"] == 1
    assert fc["bytes"] == fc["bytes_0->1"] == 8 * y_ref.numel() and fc["rounds"] == 1


def _conv_session(p, xs_plain, w, b, lw, lb):
    outs = []
    P.open_weights(p, lw if p.role == 1 else None, weight_shape=lw.shape, name="fc")
    for i, x in enumerate(xs_plain):
        xs = _inputs(p, encode(x, FRAC))
        with p.scope(f"image{i}"):
            y = P.conv2d(p, xs, w if p.role == 1 else None, b if p.role == 1 else None,
                         weight_shape=w.shape, stride=1, padding=1, name="conv1")
            z = P.linear(p, y.reshape(y.shape[0], -1), lw if p.role == 1 else None,
                         lb if p.role == 1 else None, weight_shape=lw.shape, name="fc")
        outs.append((_open(p, y), _open(p, z)))
    return outs, p.stats


def test_weights_are_opened_once_per_session_not_per_image():
    torch.manual_seed(1)
    images = [torch.randn(1, 3, 6, 6) for _ in range(3)]
    w, b = torch.randn(4, 3, 3, 3) * 0.3, torch.randn(4)
    lw, lb = torch.randn(5, 4 * 36) * 0.1, torch.randn(5)
    res = run_in_process(functools.partial(_conv_session, xs_plain=images, w=w, b=b, lw=lw, lb=lb))
    for x, (y, z) in zip(images, res[0][0]):
        y_ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
        assert torch.allclose(decode(y, FRAC), y_ref, atol=2e-3)
        assert torch.allclose(decode(z, FRAC), F.linear(y_ref.reshape(1, -1), lw.double(),
                                                        lb.double()), atol=2e-2)
    stats = [r[-1] for r in res]
    # the fc weights were opened up front (outside any image), conv1 inside image0 only
    assert merge_stats(stats, "fc/open-weights")["bytes"] == 8 * lw.numel()
    assert merge_stats(stats, "image0/conv1/open-weights")["bytes"] == 8 * w.numel()
    for i in (1, 2):
        st = merge_stats(stats, f"image{i}/conv1")
        assert st["bytes"] == 8 * (images[0].numel() + 4 * 36) and "bytes_1->0" not in st
        assert merge_stats(stats, f"image{i}/fc")["bytes"] == 8 * (4 * 36 + 5)
        assert merge_stats(stats, f"image{i}")["rounds"] == 2   # conv then linear


def _changed_weights(p, w):
    xs = _inputs(p, encode(torch.ones(1, 1, 3, 3), FRAC))
    P.conv2d(p, xs, w if p.role == 1 else None, None, weight_shape=w.shape, name="c")
    P.conv2d(p, xs, (w + 1) if p.role == 1 else None, None, weight_shape=w.shape, name="c")


def _weights_changed_in_place(p, w):
    xs = _inputs(p, encode(torch.ones(1, 1, 3, 3), FRAC))
    P.conv2d(p, xs, w if p.role == 1 else None, None, weight_shape=w.shape, name="c")
    if p.role == 1:
        w.add_(1)  # the same tensor object, modified: must not pass as already opened
    P.conv2d(p, xs, w if p.role == 1 else None, None, weight_shape=w.shape, name="c")


def test_changed_weights_under_the_same_name_are_refused():
    with pytest.raises(ValueError, match="changed within the session"):
        run_in_process(functools.partial(_changed_weights, w=torch.ones(1, 1, 3, 3)), timeout=5)
    with pytest.raises(ValueError, match="changed within the session"):
        run_in_process(functools.partial(_weights_changed_in_place, w=torch.ones(1, 1, 3, 3)),
                       timeout=5)


# --- pooling and local ops ----------------------------------------------------------------

def _pooling(p, x):
    xs = _inputs(p, encode(x, FRAC))
    outs = [P.avg_pool2d(p, xs, 2),
            P.avg_pool2d(p, xs, 3, 2, 1),
            P.avg_pool2d(p, xs, 3, 2, 1, count_include_pad=False),
            P.avg_pool2d(p, xs, (3, 2), (1, 2), divisor_override=5),
            P.global_avg_pool2d(p, xs),
            P.global_avg_pool2d(p, xs[:, :, :7, :7], keepdim=True),
            P.add(xs, xs), P.sub(xs, P.neg(xs)),
            P.concat([xs, xs[:, :1]], dim=1),
            P.add_public(p, xs, encode(torch.tensor(2.5), FRAC)),
            P.truncate(p, P.mul_public(xs, encode(torch.tensor(-0.75), FRAC)))]
    return [_open(p, t) for t in outs], p.stats


def test_pooling_and_local_ops_match_plaintext():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8) * 4
    res = run_in_process(functools.partial(_pooling, x=x))
    xd = x.double()
    refs = [F.avg_pool2d(xd, 2), F.avg_pool2d(xd, 3, 2, 1),
            F.avg_pool2d(xd, 3, 2, 1, count_include_pad=False),
            F.avg_pool2d(xd, (3, 2), (1, 2), divisor_override=5),
            xd.mean((2, 3)), xd[:, :, :7, :7].mean((2, 3), keepdim=True),
            2 * xd, 2 * xd, torch.cat([xd, xd[:, :1]], 1), xd + 2.5, -0.75 * xd]
    for got, ref in zip(res[0][0], refs):
        assert got.shape == ref.shape
        assert torch.allclose(decode(got, FRAC), ref, atol=1e-3), (got.shape, ref.shape)
    # pooling is local: nothing sent outside the share/open scopes
    total = merge_stats([r[-1] for r in res])
    opened = merge_stats([r[-1] for r in res], "reconstruct")
    assert total["bytes"] == opened["bytes"] + 64 * 3  # + the X25519 key exchange


def test_sharing_helper_input_requires_shape_and_int64():
    def fn(p):
        return P.share(p, torch.ones(3, dtype=torch.int64) if p.role == 0 else None, 0, None)
    with pytest.raises(ValueError, match="public shape"):
        run_in_process(fn, timeout=5)
    with pytest.raises(TypeError, match="int64"):
        run_in_process(lambda p: P.share(p, torch.ones(3) if p.role == 0 else None, 0, (3,)),
                       timeout=5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_protocols_on_cuda_match_cpu_ring_results():
    x, w = with_edges(rand64(2, 16, 12, 12)), server_weights(32, 16, 3, 3)

    def fn(p):
        xs = _inputs(p, x.to(p.device))
        conv = P.conv2d(p, xs, w.to(p.device) if p.role == 1 else None, None,
                        weight_shape=w.shape, padding=1, name="conv", truncate=False)
        prod = P.mul(p, xs, xs, truncate=False)
        return [None if t is None else t.cpu() for t in (_open(p, conv), _open(p, prod))]
    got = run_in_process(fn, device="cuda")[0]
    assert torch.equal(got[0], F.conv2d(x, w, padding=1)) and torch.equal(got[1], x * x)


# --- the CPU backend's kernels leave every message and share unchanged (issue 21) ---------

def _preprocessed_ring_conv(p, x, w, geom, backend):
    """Ring conv2d (int64 values, no truncation) of two layers, preprocessed, on ``backend``:
    every party's shares, its preprocessed tensors and its view."""
    p.backend = backend
    s, pad, d = geom
    P.open_weights(p, w if p.role == 1 else None, weight_shape=w.shape, name="conv")
    pre = P.preprocess(p, [("conv", x.shape, w.shape, P.conv_op(p, s, pad, d, 1))])["conv"]
    xs = _inputs(p, x)
    y = P.conv2d(p, xs, w if p.role == 1 else None, None, weight_shape=w.shape, stride=s,
                 padding=pad, dilation=d, name="conv", truncate=False, pre=pre)
    y2 = P.conv2d(p, xs, w if p.role == 1 else None, None, weight_shape=w.shape, stride=s,
                  padding=pad, dilation=d, name="conv", truncate=False)   # not preprocessed
    return [t for t in (pre.a, pre.z0, pre.c1, y, y2) if t is not None and not t.is_meta]


@pytest.mark.parametrize("xs,ws,geom", [
    ((1, 16, 4, 4), (8, 16, 3, 3), (1, 1, 1)),     # 4x4 map: im2col + matmul path
    ((2, 6, 9, 8), (4, 6, 3, 3), (2, 2, 2)),       # batch 2, 5x4 maps, dilated: matmul path
    ((1, 6, 10, 10), (4, 6, 3, 3), (1, 1, 1)),     # 10x10 map: int64 conv2d path
])
def test_cpu_backend_paths_give_bit_identical_shares_and_messages(xs, ws, geom):
    """With the pair keys fixed a session is deterministic: the default CPU backend, torch's
    int64 kernels and the float64-limb backend (the CUDA algorithm) must give every party the
    same shares and every message the same bytes, and the output must be exact mod 2^64."""
    from secure_inference.mpc.backends import CpuHybridBackend, CpuInt64Backend, LimbFloatBackend
    from secure_inference.mpc.harness import _run_in_process_with_keys
    keys = {(0, 1): b"\x01" * 32, (0, 2): b"\x02" * 32, (1, 2): b"\x03" * 32}
    x = with_edges(rand64(*xs))
    w = server_weights(*ws)
    runs = []
    for backend in (CpuHybridBackend, CpuInt64Backend, LimbFloatBackend):
        res, views = _run_in_process_with_keys(
            functools.partial(_preprocessed_ring_conv, x=x, w=w, geom=geom,
                              backend=backend()), keys)
        runs.append((res, [[m for _, _, m in v.received] for v in views]))
    (res, views), others = runs[0], runs[1:]
    for other_res, other_views in others:
        for mine, theirs in zip(res + views, other_res + other_views):
            assert len(mine) == len(theirs)
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    ref = F.conv2d(x, w, None, *geom)
    assert torch.equal(res[0][2] + res[1][1], ref)     # P0: a, z0, y, y2; P1: c1, y, y2
    assert torch.equal(res[0][3] + res[1][2], ref)
    assert len(views[1]) == 4 and all(m.numel() for m in views[1])   # c1, E, E, c1
