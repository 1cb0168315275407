"""The ``raptor`` command line: one module per command, the shared options, the progress display.

``raptor`` (the console script) and ``python -m RaptorExtension`` both call
:func:`main`.
"""

from .main import main

__all__ = ["main"]
