"""Tensor functions traced into the rewritten graphs: decisions, approximations, forecasts, error
estimates, ridge updates. No FX and no state here: passes insert calls to these functions,
AOTAutograd traces through them, and the runtimes never call them on the step path (see
docs/architecture.md, "Layers")."""
