"""lingoforge: adapt multilingual LLMs to new and updated languages cheaply.

The engine runs recipes (YAML pipelines of stages) whose stages are implemented by
pluggy plugins; see :mod:`engine.registry.hookspecs` for the contract and :mod:`engine.api`
for what plugins import.
"""

__version__ = "0.5.0"
