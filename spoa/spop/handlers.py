"""The handler API: functions registered per SPOE message name.

A handler is called as handler(message, actions): `message` is a
codec.Message (args decoded on access), `actions` the ACK writer (call
actions.set_var(Scope.TXN, "name", value) / actions.unset_var(...)). It may
be a plain function (runs inline on the event loop: keep it short) or an
`async def` (the NOTIFY is then answered when it completes, on a task).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

Handler = Callable[[Any, Any], Any]


class HandlerRegistry:
    __slots__ = ("handlers", "_async_names", "fallback")

    def __init__(self) -> None:
        # name -> handler; read by the per-message loop (spoa.spop.codec.answer_notifies), changed
        # only through register().
        self.handlers: dict[str, Handler] = {}
        self._async_names: set[str] = set()
        # Called for messages no handler is registered for (may be None).
        self.fallback: Handler | None = None

    def register(self, name: str, handler: Handler) -> None:
        if not callable(handler):
            raise TypeError(f"handler for {name!r} is not callable")
        self.handlers[name] = handler
        # Objects with an `async def __call__` are async handlers too.
        if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(getattr(handler, "__call__", None)):
            self._async_names.add(name)
        else:
            self._async_names.discard(name)

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator form of register()."""

        def decorate(fn: Handler) -> Handler:
            self.register(name, fn)
            return fn

        return decorate

    def get(self, name: str) -> Handler | None:
        return self.handlers.get(name)

    @property
    def has_async(self) -> bool:
        """Is any handler async? Without one, every NOTIFY is answered inline."""
        return bool(self._async_names)

    def needs_task(self, messages: list) -> bool:
        """True when one of these messages has an async handler."""
        return bool(self._async_names) and any(m.name in self._async_names for m in messages)

    def names(self) -> list[str]:
        return sorted(self.handlers)
