"""Concrete sizes of a graph that Dynamo traced with symbolic shapes.

A dynamic-shape graph (the default ``torch.compile`` after the second distinct input shape,
``dynamic=True``, ``mark_dynamic``) serves many resolutions and batch sizes. Its cache state is
sized with SymInts (``contract.TensorSpec.shape``); at call time the runtime binds every size symbol to the
call's value (from the SymInt arguments Dynamo passes, and from tensor sizes that are a bare
symbol) and evaluates the state shapes, so the state always matches the call. The bound values
form the *shape key*: cache state is never reused across a change of key.
"""

from __future__ import annotations

import torch


def _symbol(x):
    """The sympy Symbol behind a SymInt that is a bare symbol (s0), else None."""
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        if getattr(expr, "is_Symbol", False):
            return expr
    return None


class ShapeBinder:
    """Binds the size symbols of a graph's inputs to the values of one call.

    Args:
        example_inputs: the graph's example inputs as Dynamo traced them (SymInts and tensors with
            symbolic sizes), in placeholder order.

    ``static`` is True when no input has a symbolic size (then ``key`` is always ``()``).
    """

    def __init__(self, example_inputs: list) -> None:
        self.slots: list[tuple[int, int | None, object]] = []  # (arg index, dim or None, symbol)
        seen = set()
        for i, v in enumerate(example_inputs):
            if (sym := _symbol(v)) is not None and sym not in seen:
                self.slots.append((i, None, sym))
                seen.add(sym)
            elif isinstance(v, torch.Tensor):
                for d, size in enumerate(v.shape):
                    if (sym := _symbol(size)) is not None and sym not in seen:
                        self.slots.append((i, d, sym))
                        seen.add(sym)
        self.symbols = [s for _, _, s in self.slots]

    @property
    def static(self) -> bool:
        return not self.slots

    def key(self, args) -> tuple[int, ...]:
        """The values of the size symbols in this call (``()`` for a static graph)."""
        return tuple(int(args[i]) if d is None else int(args[i].shape[d]) for i, d, _ in self.slots)

    def evaluate(self, shape, key: tuple[int, ...]) -> tuple[int, ...]:
        """A shape of ints, SymInts or sympy expressions, evaluated for the call with ``key``.

        Raises:
            ValueError: a size depends on a symbol that no input binds.
        """
        # by name: the graph's node values and Dynamo's example inputs may come from two fake
        # modes whose symbols carry other assumptions (sympy then calls them unequal)
        import sympy

        env = {str(s): sympy.Integer(v) for s, v in zip(self.symbols, key)}
        out = []
        for d in shape:
            if isinstance(d, int):
                out.append(d)
                continue
            expr = d.node.expr if isinstance(d, torch.SymInt) else d
            val = expr.xreplace({f: env[f.name] for f in expr.free_symbols if f.name in env})
            if not getattr(val, "is_number", False):
                raise ValueError(f"shape: size {expr} depends on symbols no graph input binds (bound: {env})")
            out.append(int(val))
        return tuple(out)
