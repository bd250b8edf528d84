"""BlockReLU against a slow, independent per-channel, per-patch reference."""
import itertools
import math

import numpy as np
import pytest
import torch

from secure_inference import BlockReLU, block_cost, block_costs


def reference_block_relu(x: torch.Tensor, sizes: np.ndarray) -> torch.Tensor:
    """Loop over channels and patches; the patch is kept iff the mean of its valid pixels > 0."""
    out = torch.empty_like(x)
    n, c, height, width = x.shape
    for ch in range(c):
        h, w = int(sizes[ch, 0]), int(sizes[ch, 1])
        if h == 0 or w == 0:
            out[:, ch] = x[:, ch]
            continue
        for b in range(n):
            for top in range(0, height, h):
                for left in range(0, width, w):
                    patch = x[b, ch, top:top + h, left:left + w]
                    keep = patch.double().mean() > 0
                    out[b, ch, top:top + h, left:left + w] = patch if keep else 0 * patch
    return out


def random_sizes(c, rng, max_side=9):
    sizes = rng.integers(1, max_side, size=(c, 2))
    sizes[rng.random(c) < 0.15] = [0, 1]
    sizes[rng.random(c) < 0.15] = [1, 1]
    return sizes.astype(np.int32)


@pytest.mark.parametrize("height,width", [(7, 5), (8, 8), (1, 1), (3, 11), (16, 9)])
def test_matches_reference_on_odd_shapes(height, width):
    rng = np.random.default_rng(height * 100 + width)
    c = 12
    sizes = random_sizes(c, rng, max_side=max(height, width) + 3)  # some patches larger than map
    x = torch.randn(3, c, height, width, dtype=torch.float64)
    got = BlockReLU(sizes)(x)
    torch.testing.assert_close(got, reference_block_relu(x, sizes), rtol=0, atol=0)


def test_relu_and_identity_rows():
    x = torch.randn(2, 2, 5, 5)
    got = BlockReLU(np.array([[1, 1], [0, 1]]))(x)
    torch.testing.assert_close(got[:, 0], torch.relu(x[:, 0]))
    torch.testing.assert_close(got[:, 1], x[:, 1])


def test_partial_edge_patch_uses_mean_of_valid_pixels_only():
    # 3x3 map, 2x2 patches: the bottom-right patch is the single pixel (2, 2).
    x = torch.full((1, 1, 3, 3), -1.0)
    x[0, 0, 2, 2] = 0.5
    out = BlockReLU(np.array([[2, 2]]))(x)
    assert out[0, 0, 2, 2] == 0.5
    assert torch.all(out[0, 0, :2, :2] == 0)


def test_gradient_flows_straight_through_the_mask():
    sizes = np.array([[2, 2], [1, 1], [0, 1], [3, 1]])
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    module = BlockReLU(sizes)
    y = module(x)
    g = torch.randn_like(y)
    y.backward(g)
    mask = module.mask(x.detach())
    torch.testing.assert_close(x.grad, g * mask)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_float32_decisions(dtype):
    rng = np.random.default_rng(0)
    sizes = random_sizes(8, rng)
    x = torch.randn(2, 8, 10, 10).to(dtype)
    got = BlockReLU(sizes)(x)
    assert got.dtype == dtype
    expected = reference_block_relu(x.float(), sizes).to(dtype)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_channels_sharing_a_size_are_grouped():
    sizes = np.array([[2, 2]] * 50 + [[1, 1]] * 30 + [[0, 1]] * 20)
    module = BlockReLU(sizes)
    assert len(list(module.groups())) == 3


def test_cost_formula():
    assert block_cost(0, 1, 7, 7) == 0
    assert block_cost(1, 1, 7, 5) == 35
    assert block_cost(2, 3, 7, 5) == 4 * 2
    assert block_cost(100, 100, 7, 5) == 1
    sizes = np.array([[1, 1], [2, 3], [0, 1], [100, 1]])
    assert block_costs(sizes, 7, 5).tolist() == [35, 8, 0, 5]
    for h, w in itertools.product(range(1, 6), range(1, 6)):
        assert block_cost(h, w, 9, 4) == math.ceil(9 / h) * math.ceil(4 / w)


@pytest.mark.parametrize("bad,msg", [
    (np.array([[1, 1, 1]]), r"shape \[C, 2\]"),
    (np.array([[1.5, 1]]), "integers"),
    (np.array([[-1, 1]]), ">= 0"),
])
def test_bad_block_sizes_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        BlockReLU(bad)


def test_two_dimensional_input_after_a_linear_layer():
    x = torch.randn(5, 3)
    got = BlockReLU(np.array([[1, 1], [0, 1], [2, 2]]))(x)
    torch.testing.assert_close(got, torch.stack([x[:, 0].relu(), x[:, 1], x[:, 2].relu()], 1))


def test_wrong_channel_count_at_forward():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        BlockReLU(np.ones((3, 2), dtype=int))(torch.randn(1, 4, 5, 5))


@pytest.mark.processes
def test_torch_compile_gives_same_result():
    sizes = np.array([[2, 2], [1, 1], [0, 1], [3, 2]])
    module = BlockReLU(sizes)
    x = torch.randn(2, 4, 7, 7)
    dynamo = pytest.importorskip("torch._dynamo")
    if not dynamo.is_dynamo_supported():  # pragma: no cover - e.g. a Python dynamo lacks
        pytest.skip("torch.compile is not supported by this torch build / Python version")
    compiled = torch.compile(module, backend="eager")   # any failure here is a test failure
    torch.testing.assert_close(compiled(x), module(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    sizes = random_sizes(16, rng)
    x = torch.randn(4, 16, 13, 9)
    module = BlockReLU(sizes)
    expected = module(x)
    got = module.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected)
