"""Secure protocols on additive shares (P0/P1) with the helper P2.

Linear and pooling protocols are re-exported here; the non-linear ones (DReLU, ReLU,
Block-ReLU, max pooling) live in their own modules of this package.
"""
from .linear import (add, add_public, concat, conv2d, linear, matmul, mul, mul_public, neg,
                     open_weights, reconstruct, share, sub, to_ring, truncate)
from .pooling import avg_pool2d, div_public, global_avg_pool2d, sum_pool2d

__all__ = ["add", "add_public", "concat", "conv2d", "linear", "matmul", "mul", "mul_public",
           "neg", "open_weights", "reconstruct", "share", "sub", "to_ring", "truncate",
           "avg_pool2d", "div_public", "global_avg_pool2d", "sum_pool2d"]
