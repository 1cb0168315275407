"""``python -m RaptorExtension`` is the ``raptor`` command."""

import sys

from .cli import main

sys.exit(main())
