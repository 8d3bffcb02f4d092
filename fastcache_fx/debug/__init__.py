"""Debugging tools: explain, graph diff, decision heat maps."""
