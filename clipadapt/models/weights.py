"""Running a function of a module with some of its weights replaced, without touching the module.

Used where the evaluated model is a function of the trained one: merged LoRA weights
(W + s·BA, `methods/finetuning/lora.py`) and the WiSE-FT weight-space ensemble
(`methods/finetuning/ft.py`). `torch.func.functional_call` swaps the tensors for the duration of one
call (gradients flow into the replacements) and restores the module's own parameters afterwards, so
checkpoints always hold the trained weights and nothing has to be undone.
"""

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call


class _Call(nn.Module):
    """A throw-away module whose forward is `fn`, holding `module` so its tensors can be swapped by name."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def call_with_weights(
    module: nn.Module, weights: Mapping[str, Tensor], fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """`fn(*args, **kwargs)` while the tensors of `module` named in `weights` (as in its state dict) are replaced."""
    return functional_call(_Call(module, fn), {f"module.{name}": t for name, t in weights.items()}, args, kwargs)
