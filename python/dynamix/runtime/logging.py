"""``configure_dynamo_logging`` as in ``dynamo.runtime.logging``: one stderr handler, level from
``DYN_LOG`` (``error``, ``warn``, ``info``, ``debug``, ``trace``; default ``info``)."""

from __future__ import annotations

import logging
import os
import sys

_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING,
           "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}


def configure_dynamo_logging(service_name: str = None, worker_id: int = None) -> None:
    text = os.environ.get("DYN_LOG", "info").strip().lower()
    # DYN_LOG may be a filter list ("info,dynamix=debug"): its first bare level counts.
    level_name = next((p for p in text.split(",") if "=" not in p and p), "info")
    level = _LEVELS.get(level_name)
    if level is None:
        print(f"DYN_LOG = {text!r}: unknown level {level_name!r}; using info", file=sys.stderr)
        level = logging.INFO
    prefix = f"{service_name} " if service_name else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_dynamix", False):
            root.removeHandler(existing)
    handler._dynamix = True
    root.addHandler(handler)
    root.setLevel(level)
