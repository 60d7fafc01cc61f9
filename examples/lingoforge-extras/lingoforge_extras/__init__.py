"""lingoforge-extras: a merge method and an evaluator shipped as a third-party package.

The entry point ``extras = "lingoforge_extras"`` (group ``engine.plugins``) makes the
engine load this module; its hooks register the implementations.
"""

from __future__ import annotations

from engine.api import hookimpl
from lingoforge_extras.consensus import Consensus
from lingoforge_extras.next_token import NextTokenAccuracy

__all__ = ["Consensus", "NextTokenAccuracy"]


@hookimpl
def register_merge_methods(register):
    register(Consensus())


@hookimpl
def register_evaluators(register):
    register(NextTokenAccuracy())
