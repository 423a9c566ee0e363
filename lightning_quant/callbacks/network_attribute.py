"""Which child of a LightningModule is the network QuantCallback quantizes (and a state file restores).

Example:
    >>> from torch import nn
    >>> class Lit(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.backbone, self.loss = nn.Linear(2, 2), nn.CrossEntropyLoss()
    >>> network_attribute(Lit())
    'backbone'
"""

from __future__ import annotations

from torch import nn

__all__ = ["DEFAULT_ATTRS", "network_attribute"]

DEFAULT_ATTRS = ("model", "net", "network", "backbone")


def network_attribute(pl_module: nn.Module, module_name: str | None = None) -> str:
    """The attribute name of the network: ``module_name`` if given, else the first of :data:`DEFAULT_ATTRS` that
    holds an ``nn.Module``, else the only child.

    Raises:
        ValueError: ``module_name`` is not an ``nn.Module`` attribute, or no rule picks one child (the message lists
            the children and the fix).
    """
    if module_name is not None:
        if not isinstance(getattr(pl_module, module_name, None), nn.Module):
            raise ValueError(
                f"module_name={module_name!r}: {type(pl_module).__name__} has no nn.Module attribute of that "
                f"name; its child modules are {[n for n, _ in pl_module.named_children()]}."
            )
        return module_name
    for attr in DEFAULT_ATTRS:
        if isinstance(getattr(pl_module, attr, None), nn.Module):
            return attr
    children = [n for n, _ in pl_module.named_children()]
    if len(children) == 1:
        return children[0]
    raise ValueError(
        f"cannot tell which child of {type(pl_module).__name__} is the network to quantize (children: {children}); "
        "pass QuantCallback(module_name='<attribute>')."
    )
