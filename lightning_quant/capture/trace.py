"""Graph capture with a fallback ladder, and plain-language hints when a model cannot be traced.

Rungs, tried in order for one module:
1. ``torch.fx.symbolic_trace``;
2. the same with non-tensor keyword defaults (flags, ints, strings) fixed as constants, which removes the most
   common Python control flow on configuration arguments.
When both fail, :func:`capture` returns ``None`` and the reason; the caller then descends into the children.

Example:
    >>> from torch import fx, nn
    >>> gm, reason = capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    >>> isinstance(gm, fx.GraphModule), reason
    (True, None)
    >>> class Branchy(nn.Module):
    ...     def forward(self, x):
    ...         return x if x.sum() > 0 else -x
    >>> gm, reason = capture(Branchy())
    >>> gm is None, "control flow" in reason
    (True, True)
"""

from __future__ import annotations

import inspect
import re

from torch import fx, nn

__all__ = ["capture", "explain_trace_error"]

_HINTS = (
    (
        "symbolically traced variables cannot be used as inputs to control flow",
        "data-dependent Python control flow (an `if`/`while` on a tensor value); express it with tensor ops "
        "(torch.where, masking) or move it into a small submodule",
    ),
    ("cannot be iterated", "iteration over a tensor (for/unpacking); index explicitly or use torch.unbind"),
    ("'len' is not supported", "len() of a tensor; use x.shape[0] / x.size(0)"),
    ("'Proxy' object", "a Python builtin applied to a tensor (e.g. list(), int()); use the torch equivalent"),
    ("object is not subscriptable", "indexing into a non-tensor produced at trace time"),
)


def explain_trace_error(err: BaseException) -> str:
    """One-line reason plus a fix hint for a tracing failure."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for needle, hint in _HINTS:
        if needle in str(err):
            return f"{hint} [{type(err).__name__}: {message[:160]}]"
    return f"{type(err).__name__}: {message[:200]}"


def _constant_kwargs(module: nn.Module) -> dict[str, object]:
    """Keyword defaults of ``forward`` that are plain Python values (bool/int/float/str)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {
        name: p.default
        for name, p in params.items()
        if p.default is not inspect.Parameter.empty and isinstance(p.default, (bool, int, float, str))
    }


def capture(module: nn.Module) -> tuple[fx.GraphModule | None, str | None]:
    """Trace ``module`` into a GraphModule, or return ``(None, reason)`` when no rung of the ladder works."""
    try:
        return fx.symbolic_trace(module), None
    except Exception as err:  # noqa: BLE001 - any tracing failure moves to the next rung
        first_error = err
    constants = _constant_kwargs(module)
    if constants:
        try:
            gm = fx.symbolic_trace(module, concrete_args=constants)
        except Exception:  # noqa: BLE001
            return None, explain_trace_error(first_error)
        _restore_placeholder_names(gm, constants)
        return gm, None
    return None, explain_trace_error(first_error)


def _restore_placeholder_names(gm: fx.GraphModule, constants: dict[str, object]) -> None:
    """fx renames specialized arguments (``flag`` -> ``flag_1``); restore them so keyword calls keep working.

    The traced graph asserts the specialized value, so passing another value raises instead of being ignored.
    """
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.target not in constants:
            base = re.sub(r"_\d+$", "", str(node.target))
            if base in constants:
                node.target = base
    gm.recompile()


def is_traceable_leaf(module: nn.Module) -> bool:
    """True for modules torch.fx treats as leaves (built-in torch.nn layers)."""
    return fx.Tracer().is_leaf_module(module, "") and not isinstance(module, nn.Sequential)
