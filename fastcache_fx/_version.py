"""The package version (pyproject.toml repeats it: keep the two equal)."""

__version__ = "0.2.0"
