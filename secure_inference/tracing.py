"""The scaffolding every forward tracer of the project shares: the stack of module calls (via
forward pre/post hooks on every module), each module's dotted path, and a
``TorchFunctionMode`` through which functional calls can be seen.

Subclasses override :meth:`ModuleTracer.on_module` (called after a module returns, with the
module already popped from the stack) and ``__torch_function__``; ``with tracer:`` enables the
function mode, :meth:`ModuleTracer.remove` takes the hooks off again. Used by
:func:`secure_inference.sites.find_relu_sites` and the secure compiler's tracer.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ModuleTracer"]


class ModuleTracer(TorchFunctionMode):
    """Tracks which modules are running during one forward pass of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.paths: dict[nn.Module, str] = {m: p for p, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self._handles = []
        for module in self.paths:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.stack.append(module)

    def _leave(self, module: nn.Module, args: tuple, out: Any) -> Any:
        self.stack.pop()
        return self.on_module(module, args, out)

    def on_module(self, module: nn.Module, args: tuple, out: Any) -> Any:
        """Called when ``module`` returns ``out``; a non-None result replaces the output."""
        return None

    def current_path(self) -> str:
        """The dotted path of the innermost running module ('' at the top level)."""
        return self.paths[self.stack[-1]] if self.stack else ""

    def remove(self) -> None:
        """Take every hook off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
