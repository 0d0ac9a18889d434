"""memoryd: the memory-bank daemon and its in-process engine."""
__version__ = "0.1.0"
