"""One registry convention for everything users plug in by name: gates, heads, backbone adapters.

Every registry behaves the same way:

* ``register(name, value, overwrite=False)``: a name that is already taken is a
  :class:`~earlyexit.errors.ConfigError` unless ``overwrite=True``, so a plug-in never replaces a
  built-in (or another plug-in) by accident;
* looking up an unknown name is a :class:`~earlyexit.errors.ConfigError` that lists the known names;
* ``unregister(name)`` removes a name and is silent when it is absent, so clean-up code in a
  ``finally`` block cannot fail;
* every operation holds one lock, so threads may register, remove and look up concurrently.

Entries keep their registration order (adapters are tried in that order); ``first=True`` puts an
entry in front.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names mapped to plug-ins (factories or adapters) of one ``kind``, guarded by a lock.

    Example:
        >>> reg = Registry("gate")
        >>> reg.register("sure", object)
        >>> reg.names()
        ('sure',)
        >>> reg.register("sure", object)
        Traceback (most recent call last):
        ...
        earlyexit.errors.ConfigError: gate 'sure' is already registered; pass overwrite=True to replace it
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lock = threading.Lock()

    def register(
        self, name: str, value: T, *, overwrite: bool = False, first: bool = False
    ) -> None:
        """Add ``value`` under ``name`` (at the end, or in front with ``first=True``)."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        with self._lock:
            if name in self._entries and not overwrite:
                raise ConfigError(
                    f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it"
                )
            self._entries.pop(name, None)
            if first:
                self._entries = {name: value, **self._entries}
            else:
                self._entries[name] = value

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error when it is not registered)."""
        with self._lock:
            self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        with self._lock:
            return tuple(self._entries)

    def values(self) -> tuple[T, ...]:
        """Registered values, in registration order (a snapshot: safe to iterate while others
        register)."""
        with self._lock:
            return tuple(self._entries.values())

    def get(self, name: object, *, alternative: str = "") -> T:
        """The value registered under ``name``; else a ConfigError listing the known names, then
        ``alternative`` (e.g. ``" or pass a Gate object"``)."""
        with self._lock:
            if isinstance(name, str) and name in self._entries:
                return self._entries[name]
            known = ", ".join(sorted(self._entries))
        raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {known}{alternative}")
