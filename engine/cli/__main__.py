"""``python -m engine.cli`` is the ``engine`` command (as ``python -m engine`` is)."""

import sys

from engine.cli.commands import main

sys.exit(main())
