"""Copy-on-write for kept aliases: a recorded tensor keeps the value it had when it was recorded.

Records keep detached *aliases* of activations, not copies: a DenseNet's cat inputs are every earlier
feature map, so copying them at each cat would cost memory quadratic in depth. An in-place op later in the
step (``nn.ReLU(inplace=True)`` on a BN output, ``F.relu(x, inplace=True)`` in a user's forward, a
checkpoint's second running-stat update) would then silently change a record. :class:`CopyOnWrite` is a
dispatch mode (below autograd, so it sees every aten op, wherever it is written) that, just before an op
writes a storage some watched alias lives on, replaces each such alias in its container by a private copy.
Only writes to watched storages cost a copy; every other op pays one dictionary lookup per written argument.

A write the mode cannot see (after it exits, or under a mode that hides it) is caught by the version check
of :meth:`CopyOnWrite.stale`.
"""

from __future__ import annotations

from collections.abc import MutableMapping, MutableSequence
from dataclasses import dataclass

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from densenet_debug.capture.writes import is_mutating, written_tensors

Container = MutableSequence | MutableMapping


def storage_key(t: Tensor) -> int | None:
    """The identity of the memory ``t`` lives in (None for tensors without storage)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


@dataclass
class Slot:
    """One place (``container[key]``) that holds a watched alias, and the alias's version when recorded."""

    container: Container
    key: object
    tensor: Tensor
    version: int
    label: str

    @property
    def is_stale(self) -> bool:
        return self.container[self.key] is self.tensor and self.tensor._version != self.version


class Watcher:
    """Storage-keyed registry of kept aliases, copied out just before a write reaches their storage."""

    def __init__(self) -> None:
        self._watched: dict[int, list[Slot]] = {}
        self.copies = 0

    def watch(self, container: Container, key: object, label: str = "") -> None:
        """Keep ``container[key]`` (a tensor) at its current value for as long as writes are reported."""
        t = container[key]
        storage = storage_key(t) if isinstance(t, Tensor) else None
        if storage is not None:
            self._watched.setdefault(storage, []).append(Slot(container, key, t, t._version, label))

    def stale(self) -> list[str]:
        """Labels of watched aliases changed by a write that was not reported."""
        return [s.label for slots in self._watched.values() for s in slots if s.is_stale]

    def before_op(self, func, args: tuple, kwargs: dict) -> None:  # noqa: ANN001
        """Copy out every watched alias on a storage ``func`` is about to write."""
        if self._watched and is_mutating(func):
            for t in written_tensors(func, args, kwargs):
                self.copy_out(t)

    def copy_out(self, written: Tensor) -> None:
        slots = self._watched.pop(storage_key(written), None)
        copies: dict[tuple, Tensor] = {}  # one copy per distinct view, shared by every slot holding it
        for slot in slots or ():
            if slot.container[slot.key] is not slot.tensor:
                continue  # the container was changed by its owner since
            t = slot.tensor
            view = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if view not in copies:
                with _disable_current_modes():  # the tool's copy is no op of the step: no mode may see it
                    copies[view] = t.clone()
                self.copies += 1
            slot.container[slot.key] = copies[view]


class CopyOnWrite(TorchDispatchMode):
    """A dispatch mode that reports every aten op's writes to a :class:`Watcher`."""

    def __init__(self) -> None:
        super().__init__()
        self.watcher = Watcher()

    def watch(self, container: Container, key: object, label: str = "") -> None:
        self.watcher.watch(container, key, label)

    def stale(self) -> list[str]:
        return self.watcher.stale()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.watcher.before_op(func, args, kwargs)
        return func(*args, **kwargs)
