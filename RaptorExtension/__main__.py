"""``python -m RaptorExtension`` is the ``raptor`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # loader processes (spawn) import this module too; they must not run the CLI
    sys.exit(main())
