"""BlockReLU6 against an independent per-channel, per-patch reference in plain numpy loops."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from secure_inference.brelu import (BLOCK_MODULES, BlockReLU, BlockReLU6, block_relu6_masks,
                                    drelus_per_patch, patch_counts)


def reference_block_relu6(x: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Loop over images, channels and patches: m = mean of the patch's valid pixels; the patch
    is zeroed if m <= 0, set to 6 if m > 6, passed unchanged otherwise; identity rows pass."""
    out = np.empty_like(x)
    n, c, height, width = x.shape
    for ch in range(c):
        h, w = int(sizes[ch, 0]), int(sizes[ch, 1])
        for b in range(n):
            if h == 0 or w == 0:
                out[b, ch] = x[b, ch]
                continue
            for top in range(0, height, h):
                for left in range(0, width, w):
                    patch = x[b, ch, top:top + h, left:left + w]
                    m = float(np.mean(patch))
                    if m <= 0:
                        value = np.zeros_like(patch)
                    elif m > 6:
                        value = np.full_like(patch, 6.0)
                    else:
                        value = patch
                    out[b, ch, top:top + h, left:left + w] = value
    return out


def _around_thresholds(shape, seed: int) -> torch.Tensor:
    """Values in [-4, 10] on a 1/8 grid (sums and means exact in float64): many patch means
    land on, just below and just above 0 and 6."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(-32, 81, size=shape).astype(np.float64) / 8)


def _random_sizes(c: int, rng, max_side: int) -> np.ndarray:
    sizes = rng.integers(1, max_side, size=(c, 2))
    sizes[rng.random(c) < 0.15] = [0, 1]
    sizes[rng.random(c) < 0.15] = [1, 1]
    return sizes.astype(np.int32)


@pytest.mark.parametrize("height,width", [(7, 5), (8, 8), (1, 1), (3, 11), (16, 9)])
def test_matches_reference_with_ragged_edge_patches(height, width):
    rng = np.random.default_rng(height * 100 + width)
    c = 14
    sizes = _random_sizes(c, rng, max_side=max(height, width) + 3)   # some patches > map
    x = _around_thresholds((3, c, height, width), seed=height + width)
    got = BlockReLU6(sizes)(x)
    np.testing.assert_array_equal(got.numpy(), reference_block_relu6(x.numpy(), sizes))


def test_means_exactly_at_and_next_to_the_thresholds():
    # one channel of 2x2 patches on a 3x3 map: patches of 4, 2, 2 and 1 valid pixels
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, :2, :2] = torch.tensor([[6.0, 6.0], [7.0, 5.0]])      # mean exactly 6: kept
    x[0, 0, :2, 2] = torch.tensor([6.0, 6.0 + 2 ** -20])          # mean just above 6: 6
    x[0, 0, 2, :2] = torch.tensor([1.0, -1.0])                    # mean exactly 0: zeroed
    x[0, 0, 2, 2] = 2 ** -20                                      # mean just above 0: kept
    got = BlockReLU6(np.array([[2, 2]]))(x)[0, 0]
    want = torch.tensor([[6.0, 6.0, 6.0], [7.0, 5.0, 6.0], [0.0, 0.0, 2 ** -20]],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[1, 0] == 7.0   # a kept patch passes values above 6 (only its mean is compared)


def test_one_by_one_is_relu6_and_identity_passes_everything():
    x = torch.cat([_around_thresholds((2, 3, 6, 7), 1).reshape(-1),
                   torch.tensor([0.0, 6.0, -0.0, 1e9, -1e9])]).reshape(1, 1, 1, -1)
    torch.testing.assert_close(BlockReLU6(np.ones((1, 2)))(x), F.relu6(x), rtol=0, atol=0)
    torch.testing.assert_close(BlockReLU6(np.array([[0, 1]]))(x), x, rtol=0, atol=0)
    torch.testing.assert_close(BlockReLU6(np.array([[1, 0]]))(x), x, rtol=0, atol=0)


def test_masks_are_disjoint_and_forward_is_pass_times_x_plus_six_top():
    rng = np.random.default_rng(5)
    sizes = _random_sizes(9, rng, 6)
    x = _around_thresholds((2, 9, 7, 6), 11)
    keep, top = BlockReLU6(sizes).masks(x)
    assert set(keep.unique().tolist()) <= {0.0, 1.0} and set(top.unique().tolist()) <= {0.0, 1.0}
    assert float((keep * top).abs().max()) == 0.0
    torch.testing.assert_close(BlockReLU6(sizes)(x), x * keep + 6 * top, rtol=0, atol=0)


def test_gradient_flows_through_the_pass_mask_only():
    sizes = np.array([[2, 2], [1, 1], [0, 1], [3, 1]])
    x = (_around_thresholds((2, 4, 6, 6), 2)).requires_grad_(True)
    module = BlockReLU6(sizes)
    y = module(x)
    g = torch.randn_like(y)
    y.backward(g)
    keep, _ = module.masks(x.detach())
    torch.testing.assert_close(x.grad, g * keep)


def test_two_dimensional_input_after_a_linear_layer():
    x = torch.tensor([[-1.0, 7.0, 3.0], [2.0, -5.0, 9.0]])
    got = BlockReLU6(np.array([[1, 1], [0, 1], [2, 2]]))(x)
    torch.testing.assert_close(got, torch.tensor([[0.0, 7.0, 3.0], [2.0, -5.0, 6.0]]))


def test_groups_sizes_and_costs_like_block_relu():
    sizes = np.array([[2, 2]] * 5 + [[1, 1]] * 3 + [[0, 1]] * 2)
    assert [k for k, _ in BlockReLU6(sizes).groups()] == [k for k, _ in BlockReLU(sizes).groups()]
    assert drelus_per_patch("relu") == 1 and drelus_per_patch("relu6") == 2
    assert BLOCK_MODULES == {"relu": BlockReLU, "relu6": BlockReLU6}
    assert not isinstance(BlockReLU6(sizes), BlockReLU)
    with pytest.raises(ValueError, match="activation"):
        drelus_per_patch("gelu")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        BlockReLU6(np.ones((3, 2), dtype=int))(torch.randn(1, 4, 5, 5))


def test_patch_counts_of_ragged_maps():
    assert patch_counts(5, 7, 2, 3).tolist() == [[6, 6, 2], [6, 6, 2], [3, 3, 1]]
    assert patch_counts(4, 4, 4, 4).tolist() == [[16]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_decides_on_float32_sums(dtype):
    x = _around_thresholds((2, 1, 9, 9), 4).to(dtype)
    keep, top = block_relu6_masks(x, 3, 3)
    k32, t32 = block_relu6_masks(x.float(), 3, 3)
    assert keep.dtype == dtype
    torch.testing.assert_close(keep.float(), k32, rtol=0, atol=0)
    torch.testing.assert_close(top.float(), t32, rtol=0, atol=0)
