"""Secure protocols on additive shares (P0/P1) with the helper P2.

Linear and pooling protocols are re-exported here; the non-linear ones (DReLU, ReLU,
Block-ReLU, max pooling) live in their own modules of this package.
"""
from .linear import (Preprocessed, add, add_public, concat, conv2d, conv_op, linear, linear_op,
                     matmul, mul, mul_public, neg, open_weights, preprocess, reconstruct, share,
                     sub, to_ring, truncate)
from .pooling import avg_pool2d, div_public, global_avg_pool2d, sum_pool2d

__all__ = ["add", "add_public", "concat", "conv2d", "linear", "matmul", "mul", "mul_public",
           "neg", "open_weights", "reconstruct", "share", "sub", "to_ring", "truncate",
           "Preprocessed", "preprocess", "conv_op", "linear_op",
           "avg_pool2d", "div_public", "global_avg_pool2d", "sum_pool2d"]
