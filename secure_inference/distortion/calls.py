"""Call tracing for the exact engine: every module call of one forward pass, in order (the
forward must be static: the same calls every run)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..sites import run_model


@dataclass
class _Call:
    module: nn.Module
    path: str
    start: int     # position of the call in the forward (pre-order numbering)
    end: int = -1  # first position after all calls nested in this one
    parent: int = -1


class _CallCounter:
    """Pre/post hooks on every module numbering the module calls of one forward in pre-order."""

    def __init__(self, model: nn.Module) -> None:
        self.paths = [(p, m) for p, m in model.named_modules()]
        self.counter = 0
        self.stack: list[int] = []
        self.handles: list = []
        self.on_pre: Callable[[int, nn.Module, tuple], None] | None = None
        self.on_post: Callable[[int, nn.Module, object], object] | None = None

    def __enter__(self) -> "_CallCounter":
        for _, m in self.paths:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        self.counter = 0
        self.stack = []
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, module, args):
        idx = self.counter
        self.counter += 1
        self.stack.append(idx)
        if self.on_pre is not None:
            self.on_pre(idx, module, args)

    def _post(self, module, args, out):
        idx = self.stack.pop()
        if self.on_post is not None:
            return self.on_post(idx, module, out)
        return None


def trace_calls(model: nn.Module, x: torch.Tensor) -> list[_Call]:
    """Every module call of one forward of ``model`` on ``x``, in pre-order."""
    counter = _CallCounter(model)
    paths = {m: p for p, m in counter.paths}
    calls: list[_Call] = []

    def pre(idx, module, args):
        parent = counter.stack[-2] if len(counter.stack) > 1 else -1
        calls.append(_Call(module, paths[module], idx, parent=parent))

    def post(idx, module, out):
        calls[idx].end = counter.counter
        return None

    counter.on_pre, counter.on_post = pre, post
    with torch.no_grad(), counter:
        run_model(model, x)
    return calls
