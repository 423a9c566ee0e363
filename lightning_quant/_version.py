"""The package version: one place, read by the package, the exporters and the build (pyproject.toml)."""

__version__ = "0.2.0"
