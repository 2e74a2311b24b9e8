"""The latent pool: tensors worth keeping between shots, resident on the render device.

What goes in is expensive to recompute and cheap to keep: keyframe VAE latents (one latent frame,
~0.2 MB at 480p), the all-zero conditioning clip per resolution, the negative-prompt text
embedding. The pool holds them on the device within a byte budget; the least recently used
entries spill to CPU memory (a second budget) and are dropped past that. Keys are tuples whose
first element is a namespace ("shared" or a story id) so a finished story can be released whole.
Hits and misses are counted as two numbers, never as a ratio.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch


@dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    spills: int = 0
    drops: int = 0
    device_bytes: int = 0
    cpu_bytes: int = 0
    entries: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LatentPool:
    def __init__(self, device: str | torch.device = "cpu", budget_bytes: int = 512 << 20, cpu_budget_bytes: int = 2 << 30):
        self.device = torch.device(device)
        self.budget_bytes = int(budget_bytes)
        self.cpu_budget_bytes = int(cpu_budget_bytes)
        self._device: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._cpu: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = PoolStats()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            if key in self._device:
                self._device.move_to_end(key)
                self.stats.hits += 1
                return self._device[key]
            if key in self._cpu:
                tensor = self._cpu.pop(key).to(self.device)
                self._store(key, tensor)
                self.stats.hits += 1
                return tensor
            self.stats.misses += 1
            return None

    def put(self, key: tuple, tensor: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._device.pop(key, None)
            self._cpu.pop(key, None)
            tensor = tensor.detach().to(self.device)
            self._store(key, tensor)
            return tensor

    def get_or_create(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        found = self.get(key)
        return found if found is not None else self.put(key, make())

    def release(self, namespace: Hashable) -> int:
        """Drop every entry of one namespace (a finished story); returns how many."""
        with self._lock:
            gone = [k for k in list(self._device) + list(self._cpu) if k[0] == namespace]
            for k in gone:
                self._device.pop(k, None)
                self._cpu.pop(k, None)
            self._account()
            return len(gone)

    def namespaces(self) -> set:
        """The namespaces (stories, and "shared") that have entries in the pool."""
        with self._lock:
            return {k[0] for k in list(self._device) + list(self._cpu)}

    def __contains__(self, key: tuple) -> bool:
        return key in self._device or key in self._cpu

    def _store(self, key, tensor):
        self._device[key] = tensor
        while self._bytes(self._device) > self.budget_bytes and len(self._device) > 1:
            old_key, old = self._device.popitem(last=False)
            self._cpu[old_key] = old.to("cpu")
            self.stats.spills += 1
        while self._bytes(self._cpu) > self.cpu_budget_bytes and self._cpu:
            self._cpu.popitem(last=False)
            self.stats.drops += 1
        self._account()

    @staticmethod
    def _bytes(entries) -> int:
        return sum(_nbytes(t) for t in entries.values())

    def _account(self):
        self.stats.device_bytes = self._bytes(self._device)
        self.stats.cpu_bytes = self._bytes(self._cpu)
        self.stats.entries = len(self._device) + len(self._cpu)
