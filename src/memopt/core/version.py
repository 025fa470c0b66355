"""memopt's version, in one place (the package's ``__version__`` and every manifest read it)."""

__all__ = ["VERSION"]

VERSION = "0.1.0"
