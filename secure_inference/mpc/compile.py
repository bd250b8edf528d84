"""Compile a torch model into a program of secure layers (public) plus the server's weights.

The compiler is split along its seams; this module keeps the names users import:

* :mod:`.program`: the program's types (:class:`Layer`, :class:`Program`, :class:`Weights`);
* :mod:`.ops`: the op table, one class per op (plaintext run, secure run, DReLU count, error
  propagation, truncations);
* :mod:`.trace`: :func:`compile_model`, the tracer that turns a torch model into a program
  (BatchNorm folded, sites attached);
* :mod:`.analysis`: :func:`run_float`, :func:`error_std`, :func:`error_bound`,
  :func:`truncation_failures`.
"""
from __future__ import annotations

from .analysis import error_bound, error_std, run_float, truncation_failures
from .program import Layer, Program, UnsupportedOperationError, Weights
from .trace import compile_model, fold_bn, resize_matrices

__all__ = ["Layer", "Program", "Weights", "UnsupportedOperationError", "compile_model",
           "run_float", "fold_bn", "resize_matrices", "error_std", "error_bound",
           "truncation_failures"]
