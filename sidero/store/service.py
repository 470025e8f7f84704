# -*- test-case-name: tests.service.test_tap -*-
"""The resource store as a service: open before anything reads it, closed after everything stopped."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred


class StoreService(Service):
    """Opens the resource store on start (before anything reads it) and closes it on stop.

    The root service starts children in order and stops them in reverse, so every reader
    (controllers, protocols) has stopped before the store closes.
    """

    def __init__(self, store: Any, directory: str) -> None:
        self.store = store
        self.directory = directory

    def startService(self) -> Deferred[Any]:
        super().startService()
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        return ensureDeferred(self.store.open())

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return ensureDeferred(self.store.close())
