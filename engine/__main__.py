"""``python -m engine`` (and ``accelerate launch -m engine``) is the ``engine`` command."""

import sys

from engine.cli.commands import main

sys.exit(main())
