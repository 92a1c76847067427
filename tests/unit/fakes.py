"""Small stand-ins the unit tests share."""

from __future__ import annotations

import threading


class FakeStore:
    """The part of a c10d store jitckpt uses, in memory: values come back as
    bytes, ``add`` keeps an integer counter, ``compare_set`` as c10d's."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def set(self, key: str, value: str | bytes) -> None:
        with self.lock:
            self.data[key] = value.encode() if isinstance(value, str) else bytes(value)

    def get(self, key: str) -> bytes:
        with self.lock:
            return self.data[key]

    def check(self, keys: list[str]) -> bool:
        with self.lock:
            return all(key in self.data for key in keys)

    def add(self, key: str, amount: int) -> int:
        with self.lock:
            value = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(value).encode()
            return value

    def delete_key(self, key: str) -> bool:
        with self.lock:
            return self.data.pop(key, None) is not None
