"""A custom op's arguments by name, read once from its schema.

Autograd and fake-tensor registrations receive a custom op's inputs as one positional tuple.
Instead of counting positions by hand (``n_args=28, row_scale_arg=8, ...``, which silently go
wrong when an argument is added), registrations name the arguments they need and these helpers
find their positions in the op's schema (the signature ``torch.library.custom_op`` inferred from
the Python function), raising at import time if a name is not an argument of the op.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Sequence

__all__ = ["OpArgs", "register_named_fake"]


class OpArgs:
    """The argument names of a custom op (``torch.library.custom_op``), in schema order."""

    def __init__(self, op):
        self.op_name = op._opoverload._schema.name
        self.names = tuple(a.name for a in op._opoverload._schema.arguments)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """The position of the argument ``name``; ValueError naming the op's arguments if it
        has none of that name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(
                f"{self.op_name} has no argument {name!r}; its arguments are {list(self.names)}"
            ) from None

    def bind(self, inputs: Sequence, keywords: dict | None = None) -> SimpleNamespace:
        """One call's ``inputs`` (and ``keywords``) as attributes named like the arguments."""
        return SimpleNamespace(**dict(zip(self.names, inputs)), **(keywords or {}))


def register_named_fake(op, fake: Callable[[SimpleNamespace], object]) -> None:
    """Registers ``fake(args)`` as ``op``'s fake (meta) implementation, ``args`` holding the
    call's arguments by name (``args.hidden``, ``args.need_weight``, ...), so the fake lists
    only the arguments its output shapes depend on."""
    args = OpArgs(op)

    def _fake(*inputs, **keywords):
        return fake(args.bind(inputs, keywords))

    op.register_fake(_fake)
