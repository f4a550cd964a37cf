"""Name-to-builder registries for stages, models, heads, datasets and samplers.

Keys are explicit strings (never ``__name__``) because they enter the stage-key hash: renaming a
Python function must not change which artifacts a spec points at. A duplicate key fails at import;
an unknown key lists the known ones and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ray_lt.errors import RayLtError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named map from string keys to objects (usually builders)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._items: dict[str, T] = {}

    def register(self, key: str) -> Callable[[T], T]:
        """Decorator that stores ``obj`` under ``key``; a second ``key`` is an error."""

        def add(obj: T) -> T:
            if key in self._items:
                raise RayLtError(f"duplicate {self.name} '{key}': each key may be registered once")
            self._items[key] = obj
            return obj

        return add

    def get(self, key: str) -> T:
        """The object registered as ``key``; an unknown key names the known ones."""
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            close = difflib.get_close_matches(str(key), list(self._items), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UnknownNameError(f"unknown {self.name} '{key}'; known: {known}{hint}") from None

    def names(self) -> list[str]:
        """Registered keys, sorted."""
        return sorted(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
