"""The package version, in a module of its own so that submodules can import it without the package ``__init__``."""

__all__ = ["__version__"]

__version__ = "0.1.0"
