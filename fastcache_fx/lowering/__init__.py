"""Lowering of (rewritten) graphs: Inductor, TensorRT (optional), export."""
