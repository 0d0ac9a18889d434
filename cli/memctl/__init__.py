"""memctl: the command line that administers memoryd memory banks.

The commands live in `memctl.cli` (entry point `memctl.cli:main`); text and
JSON rendering in `memctl.output`.
"""
from memoryd import __version__

__all__ = ["__version__"]
