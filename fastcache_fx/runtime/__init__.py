"""What lives across calls: per-graph, per-context cache state, decisions, statistics."""
