"""What a merge method uses: the streaming merge engine, parameter declarations and
merge arithmetic (see docs/merging.md for the conventions and the method contract)."""

from engine.merging import *  # noqa: F403  (the merging package's public names, listed there)
from engine.merging import __all__  # noqa: F401
