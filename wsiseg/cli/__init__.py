"""The ``wsiseg`` command line (:mod:`wsiseg.cli.main`); ``wsiseg = "wsiseg.cli:main"`` in pyproject.toml."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
