"""The plugins: the hooks they implement, what an implementation is, and the manager
that loads them and collects what they register.

* :mod:`engine.registry.hookspecs` -- the hook specification, generated from the stage
  kinds table;
* :mod:`engine.registry.implementation` -- what ``register(...)`` accepts and the helpers
  that read an implementation's optional attributes;
* :mod:`engine.registry.manager` -- loading built-in and third-party plugins, broken ones
  kept apart, the implementations per stage kind;
* :mod:`engine.registry.info` -- what ``engine plugins`` shows.

Plugins import :func:`hookimpl` and :class:`StageImplementation` from :mod:`engine.api`.
"""

from engine.registry.hookspecs import hookimpl
from engine.registry.implementation import (
    StageImplementation,
    data_format_error,
    describe,
    requirement_hint,
)
from engine.registry.info import plugins_info
from engine.registry.manager import (
    Registered,
    call_observers,
    get_implementation,
    implementations,
    pm,
)

__all__ = ["Registered", "StageImplementation", "call_observers", "data_format_error", "describe",
           "get_implementation", "hookimpl", "implementations", "plugins_info", "pm",
           "requirement_hint"]
