"""Run an unmodified Dynamo script under dynamix (python-sdk spec §1)::

    python -m dynamix.compat worker.py [args...]

Before the script runs, ``dynamo``, ``dynamo.runtime``, ``dynamo.runtime.logging``, ``dynamo.llm``,
``dynamo.llm.exceptions`` and ``dynamo._core`` resolve to the dynamix modules, in this process only;
no file is written. Any other ``dynamo.*`` import fails naming the module.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
import types

_ALIASES = {
    "dynamo.runtime": "dynamix.runtime",
    "dynamo.runtime.logging": "dynamix.runtime.logging",
    "dynamo.llm": "dynamix.llm",
    "dynamo.llm.exceptions": "dynamix.llm.exceptions",
    "dynamo._core": "dynamix._core",
}


class _Refuse(importlib.abc.MetaPathFinder):
    """Any ``dynamo.*`` module dynamix does not provide is an ImportError naming it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("dynamo.") and fullname not in _ALIASES:
            raise ImportError(
                f"{fullname} is not available under dynamix.compat: dynamix provides only "
                "dynamo.runtime and dynamo.llm",
                name=fullname,
            )
        return None


def install() -> None:
    """Alias the ``dynamo`` modules to dynamix in ``sys.modules`` (idempotent)."""
    if importlib.util.find_spec("dynamo") is not None and "dynamo" not in sys.modules:
        print("dynamix.compat: the installed ai-dynamo package is shadowed by dynamix for this run",
              file=sys.stderr)
    package = types.ModuleType("dynamo")
    package.__path__ = []  # a package, so submodule imports go through sys.modules
    package.__doc__ = "dynamix, standing in for dynamo (dynamix.compat)"
    sys.modules["dynamo"] = package
    for alias, real in _ALIASES.items():
        module = importlib.import_module(real)
        sys.modules[alias] = module
        parent, _, child = alias.rpartition(".")
        setattr(sys.modules[parent], child, module)
    if not any(isinstance(f, _Refuse) for f in sys.meta_path):
        sys.meta_path.insert(0, _Refuse())


def main(argv: list) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m dynamix.compat SCRIPT.py [ARGS...]", file=sys.stderr)
        return 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f"dynamix.compat: {script}: no such file", file=sys.stderr)
        return 2
    install()
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
