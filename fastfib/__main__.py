"""``python -m fastfib`` is the ``fastfib`` command."""

import sys

from .cli import main

sys.exit(main())
