"""Pure FX graph passes: GraphModule in, GraphModule (+ a small result record) out."""
