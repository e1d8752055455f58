"""A byte-bounded, thread-safe LRU keyed by content hashes: the engine's encoder and
processed-image caches, the media loader's decoded-image cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

V = TypeVar("V", bound=Any)


class BytesLRU(Generic[V]):
    """Thread-safe (the encoder thread fills the encoder cache, the inference thread may read it
    on a recompute; decoding threads share the media cache). ``size(value)`` is what an entry
    costs (its ``nbytes`` by default). A budget of 0 turns it off; an entry larger than the whole
    budget is never kept."""

    def __init__(self, max_bytes: int, size: Callable[[V], int] | None = None) -> None:
        self.max_bytes = max_bytes
        self._size = size or (lambda value: value.nbytes)
        self._entries: OrderedDict[bytes, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> V | None:
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: bytes, features: V) -> None:
        size = self._size(features)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            self._entries[key] = features
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= self._size(evicted)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
