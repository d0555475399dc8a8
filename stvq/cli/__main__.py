"""``python -m stvq.cli``: the ``stvq`` command."""

import sys

from stvq.cli import main

sys.exit(main())
