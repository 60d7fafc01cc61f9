"""The ``engine`` command: :func:`main` parses the command line and runs one command.

* :mod:`engine.cli.commands` -- the parser, ``run``, ``validate``, ``plugins``, ``schema``;
* :mod:`engine.cli.common` -- exit codes, quiet libraries and the recipe turned into a plan;
* :mod:`engine.cli.merge` -- ``engine merge``;
* :mod:`engine.cli.ops` -- ``engine status``, ``engine cache``, ``run --dry-run/--only/--from``;
* :mod:`engine.cli.report` -- ``engine report`` and the end of ``engine run``;
* :mod:`engine.cli.coverage` -- ``engine coverage`` and ``engine extend-tokenizer``;
* :mod:`engine.cli.api_reference` -- ``engine schema --api``.
"""

from engine.cli.commands import main

__all__ = ["main"]
