"""Typed records read as mappings: a frozen dataclass at a boundary (a manifest stage, the limits, a
call's timings) that callers may also read as `record["name"]`, `record.get(...)` or `dict(record)`
(JSON). A subclass says which items it shows with `_items()`."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping


class RecordMapping(Mapping):
    """The read-only Mapping half of a typed record: `_items()` gives the name -> value it shows."""

    @abstractmethod
    def _items(self) -> dict:
        """name -> value of what the record shows as a mapping."""

    def __getitem__(self, name: str):
        return self._items()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())
