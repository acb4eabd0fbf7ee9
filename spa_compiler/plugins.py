"""Registries of named classes (criteria, cost metrics) and loading third-party extensions
from Python entry points (criteria, op rules)."""

from __future__ import annotations

import logging
from importlib import metadata

__all__ = ["load_entry_points", "register_named"]

log = logging.getLogger(__name__)

_LOADED: set[str] = set()


def load_entry_points(group: str) -> list[tuple[str, object]]:
    """Load every entry point of ``group``, once per process; returns ``(name, object)`` pairs
    (empty on later calls). A plugin that fails to load is logged and skipped."""
    if group in _LOADED:
        return []
    _LOADED.add(group)
    loaded = []
    for entry in metadata.entry_points(group=group):
        try:
            loaded.append((entry.name, entry.load()))
        except Exception as exc:  # a broken plugin must not break the others
            log.warning("could not load %s plugin %s: %s", group, entry.name, exc)
    return loaded


def register_named(table: dict[str, type], kind: str, name: str, cls: type) -> type:
    """Put ``cls`` in ``table`` under ``name`` (and set ``cls.name``); a name already taken by
    another class is an error."""
    taken = table.get(name)
    if taken is not None and taken is not cls:
        raise ValueError(f"{kind} '{name}' is already registered by {taken.__module__}.{taken.__qualname__}")
    cls.name = name
    table[name] = cls
    return cls
