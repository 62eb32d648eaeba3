"""Encoder-output cache: audio content hash -> (rows, hidden) embeddings, LRU within a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

DEFAULT_BUDGET_BYTES = 512 << 20  # 512 MiB: ~4.7 ten-minute audios at full size in bf16 (107.5 MB each)


class EmbeddingCache:
    """Thread-safe LRU of encoder outputs. `budget_bytes=0` disables caching."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        if budget_bytes < 0:
            raise ValueError(f"expected a cache budget >= 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            if size > self.budget:
                return  # larger than the whole budget: do not evict everything for it
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.budget:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()
