"""What :class:`~distckpt.lightning.DistckptCallback` saves beside the module, optimizers,
schedulers and loops, as Lightning's own checkpoints carry it: every stateful callback's
``state_dict()``, the keys each callback's ``on_save_checkpoint`` adds and those the module's
adds (:class:`LightningExtras`), and the Trainer's nested state as ``torch.save`` bytes
(:class:`AsBytes`), for the "dcp" format, which loads back only tensors and the leaves of a
structure given in advance."""

from __future__ import annotations

import copy
import io
from typing import Any

import lightning
import torch
from lightning import Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from distckpt.errors import UnloadableState, UnsafeCheckpoint
from distckpt.formats.base import ReadOptions
from distckpt.formats.torch_files import safe_torch_load
from distckpt.state import apply_load, check_load, to_plain


def to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes | torch.Tensor, what: str) -> Any:
    """What :func:`to_bytes` made, loaded as torch loads weights; ``data`` may be those bytes
    as a ``uint8`` tensor (:class:`BytesAsTensors`)."""
    if isinstance(data, torch.Tensor):
        data = data.numpy().tobytes()
    return safe_torch_load(io.BytesIO(data), ReadOptions(), name=what)


class BytesAsTensors:
    """Saves the ``bytes`` values of ``inner.state_dict()`` as ``uint8`` tensors of the same
    bytes: the "torch" format writes a tensor's bytes raw, whereas a ``bytes`` value in its
    pickled skeleton takes half as much room again (``torch.save`` pickles with protocol 2,
    which writes bytes as latin-1 text encoded in UTF-8). :func:`from_bytes` loads either;
    ``load_state_dict`` hands what it is given to ``inner``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def state_dict(self) -> dict[str, Any]:
        return {
            key: torch.frombuffer(bytearray(value), dtype=torch.uint8)
            if isinstance(value, bytes) and value
            else value
            for key, value in self.inner.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class AsBytes:
    """A nested state (objects with ``state_dict()`` in it saved through it) saved as the
    ``torch.save`` bytes of its plain form, and loaded back in place, as strictly as a
    restore loads. For the "dcp" format, which loads back only tensors and the leaves of the
    structure it is given, and drops empty dicts, tuples and non-string keys on the way: the
    Trainer's loop state holds all of these."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, bytes]:
        return {"torch_save": to_bytes(to_plain(self.state))}

    def load_state_dict(self, saved: dict[str, bytes]) -> None:
        loaded = from_bytes(saved["torch_save"], "the training state")
        check_load(self.state, loaded, strict=True)
        apply_load(self.state, loaded)


#: The entries of Lightning's own checkpoint dict that the module's ``on_save_checkpoint`` and
#: ``on_load_checkpoint`` find in theirs: the cheap ones (the module's ``state_dict()`` holds its
#: tensors themselves, not copies). The rest (``optimizer_states``, ``loops``, ``callbacks``, ...)
#: would cost a copy of state saved elsewhere.
LIGHTNING_ENTRIES = ("epoch", "global_step", "pytorch-lightning_version", "state_dict")


#: What a callback's ``on_save_checkpoint`` dict holds, saved, in place of a value that is
#: Lightning's ``state_dict`` entry itself (``WeightAveraging`` moves it to
#: ``current_model_state``): the module, saved whole already, is not saved a second time, and
#: the value is refilled at load with the ``state_dict`` entry then (the restored module's).
MODULE_STATE_MARK = {"distckpt.lightning": "the module's state_dict"}


def _is_module_state_mark(value: Any) -> bool:
    if not isinstance(value, dict) or value.keys() != MODULE_STATE_MARK.keys():
        return False
    # Key by key: == on a whole dict holding a tensor would compare the tensor.
    marks = MODULE_STATE_MARK.items()
    return all(isinstance(value[key], str) and value[key] == text for key, text in marks)


def lightning_entries(trainer: Trainer) -> dict[str, Any]:
    """:data:`LIGHTNING_ENTRIES`, as Lightning's ``dump_checkpoint`` fills them."""
    return {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "pytorch-lightning_version": lightning.__version__,
        # The module's own, not the strategy's (which gathers a sharded module on every rank).
        "state_dict": trainer.lightning_module.state_dict(),
    }


#: What :func:`check_loadable` checks: the ``state_key`` an :class:`~distckpt.UnloadableState`
#: names, what the value is (for its message) and the value.
SavedPart = tuple[str, str, Any]


def check_loadable(saved: dict[str, bytes], parts: list[SavedPart]) -> None:
    """Raises :class:`~distckpt.UnloadableState` naming the first of ``parts`` (the values whose
    bytes ``saved`` holds) that a restore would refuse to load, before the save: a checkpoint
    holding one could never be resumed. One more read of what ``saved`` holds: cheap for the
    usual small states, as costly as a load of the weights a callback keeps (the averaged
    weights of Lightning's ``WeightAveraging``)."""
    try:
        for key, data in saved.items():
            from_bytes(data, key)
        return
    except UnsafeCheckpoint:
        pass
    for state_key, what, value in parts:
        try:
            from_bytes(to_bytes(value), state_key)
        except UnsafeCheckpoint as refusal:
            # Its advice (allow_pickle=True) is for loading: not something a resume here takes.
            refused = str(refusal).split(", so it was not loaded")[0]
            raise UnloadableState(
                f"{what} cannot be saved: a resume loads it as torch loads weights (tensors, "
                "numbers, strings, and lists, tuples and dicts of them), which refuses it. "
                f"Save plain values instead (float(x) for a numpy scalar): {refused}",
                state_key=state_key,
                refused=refused,
            ) from None


def _overrides(callback: lightning.Callback, hook: str) -> bool:
    """Whether ``callback``'s class has a ``hook`` of its own: calling the base class's, which
    does nothing, is left out."""
    return is_overridden(hook, callback, lightning.Callback)


class _PendingLoad:
    """What a restore loaded for :meth:`LightningExtras.finish_restore` to hand out."""

    def __init__(
        self,
        callbacks: dict[str, Any],
        module_checkpoint: dict[str, Any],
        callback_checkpoints: dict[str, dict[Any, Any]],
    ) -> None:
        self.callbacks = callbacks
        self.module_checkpoint = module_checkpoint
        self.callback_checkpoints = callback_checkpoints


class LightningExtras:
    """What Lightning's own checkpoints carry besides the module, optimizers, schedulers and
    loops: every stateful callback's ``state_dict()`` keyed by its ``state_key`` (as
    Lightning's ``checkpoint["callbacks"]``; the callbacks in ``skipped`` and empty states left
    out), the keys each callback's ``on_save_checkpoint`` added to its dict, keyed by its
    ``state_key`` (callbacks that added nothing left out), and the keys the module's
    ``on_save_checkpoint`` added to its dict.

    Each is saved as ``torch.save`` bytes, one plain value: which callbacks, and which keys a
    hook adds, may differ between the run that saves and the one that resumes, and a restore
    loads into a structure given in advance (the "dcp" format reads only the keys it is given
    and flattens tuples and non-string keys). The bytes come back exactly as saved, and are
    loaded as torch loads weights (tensors and plain containers only).

    A restore only loads them; :meth:`finish_restore`, once the whole restore is done, hands
    them to the hooks and the callbacks' ``load_state_dict`` in Lightning's order."""

    #: The keys a checkpoint saved before the callbacks' checkpoint hooks were called lacks.
    NEWER_KEYS = ("callback_checkpoints",)
    KEYS = ("callbacks", "module_checkpoint", *NEWER_KEYS)

    def __init__(self, trainer: Trainer, skipped: tuple[lightning.Callback, ...]) -> None:
        self.trainer = trainer
        self.skipped = skipped
        self.pending: _PendingLoad | None = None

    def _callbacks(self) -> list[lightning.Callback]:
        """The Trainer's callbacks but ``skipped`` (the caller's own), in the Trainer's order."""
        return [
            callback
            for callback in self.trainer.callbacks
            if not any(callback is skipped for skipped in self.skipped)
        ]

    def state_dict(self) -> dict[str, bytes]:
        # Lightning's order: every callback's state_dict(), then every callback's
        # on_save_checkpoint, then the module's.
        callbacks: dict[str, Any] = {}
        for callback in self._callbacks():
            state = callback.state_dict()
            if state:
                callbacks[callback.state_key] = state
        callback_checkpoints: dict[str, dict[Any, Any]] = {}
        for callback in self._callbacks():
            if _overrides(callback, "on_save_checkpoint"):
                kept = self._callback_checkpoint(callback)
                if kept:
                    callback_checkpoints[callback.state_key] = kept
        # The hook reads Lightning's cheap entries as it would in Lightning's own checkpoint
        # (rewriting ``checkpoint["state_dict"]`` is a common idiom); only what it adds is
        # saved: the module and the loops are saved from themselves.
        module_checkpoint = lightning_entries(self.trainer)
        self.trainer.lightning_module.on_save_checkpoint(module_checkpoint)
        added = {
            key: value for key, value in module_checkpoint.items() if key not in LIGHTNING_ENTRIES
        }
        saved = {
            "callbacks": to_bytes(callbacks),
            "module_checkpoint": to_bytes(added),
            "callback_checkpoints": to_bytes(callback_checkpoints),
        }
        check_loadable(
            saved,
            [
                *[
                    (state_key, f"the state_dict() of the callback {state_key!r}", state)
                    for state_key, state in callbacks.items()
                ],
                *[
                    (
                        state_key,
                        f"what the on_save_checkpoint of the callback {state_key!r} added",
                        kept,
                    )
                    for state_key, kept in callback_checkpoints.items()
                ],
                ("on_save_checkpoint", "the keys the module's on_save_checkpoint added", added),
            ],
        )
        return saved

    def _callback_checkpoint(self, callback: lightning.Callback) -> dict[Any, Any]:
        """Calls ``callback.on_save_checkpoint`` with a dict of its own holding Lightning's cheap
        entries (so that two callbacks adding the same key keep each their own); what it added.
        A callback that reads its dict back (its class has an ``on_load_checkpoint``) also
        keeps the entries it replaced: Lightning's ``WeightAveraging`` puts the averaged
        weights in ``state_dict`` and reads them back from there. A value that is the given
        ``state_dict`` entry itself (``WeightAveraging`` moves it to ``current_model_state``)
        is kept as :data:`MODULE_STATE_MARK`."""
        given = lightning_entries(self.trainer)
        checkpoint = dict(given)
        callback.on_save_checkpoint(self.trainer, self.trainer.lightning_module, checkpoint)
        reads_back = _overrides(callback, "on_load_checkpoint")
        return {
            key: MODULE_STATE_MARK if value is given["state_dict"] else value
            for key, value in checkpoint.items()
            if key not in given or (reads_back and value is not given[key])
        }

    def load_state_dict(self, state: dict[str, bytes | torch.Tensor]) -> None:
        """Keeps what was saved for :meth:`finish_restore`; a checkpoint saved before the
        callbacks' hooks were called (it lacks :data:`NEWER_KEYS`) has nothing for them. A saved
        state whose callback is gone is warned about, as Lightning's own restore does."""
        callbacks: dict[str, Any] = from_bytes(state["callbacks"], "the callbacks' states")
        module_checkpoint: dict[str, Any] = from_bytes(
            state["module_checkpoint"], "the module's on_save_checkpoint dict"
        )
        callback_checkpoints: dict[str, dict[Any, Any]] = {}
        if "callback_checkpoints" in state:
            callback_checkpoints = from_bytes(
                state["callback_checkpoints"], "the callbacks' on_save_checkpoint dicts"
            )
        present = {callback.state_key for callback in self.trainer.callbacks}
        gone = sorted(set(callbacks).union(callback_checkpoints) - present)
        if gone:
            rank_zero_warn(
                "The checkpoint holds the state of callbacks this Trainer does not have: pass "
                f"the callbacks it was saved with to resume them. Missing: {gone}"
            )
        self.pending = _PendingLoad(callbacks, module_checkpoint, callback_checkpoints)

    def finish_restore(self) -> None:
        """If a restore loaded this state, hands it out in the order of Lightning's own restore:
        the module's ``on_load_checkpoint`` (the keys its ``on_save_checkpoint`` added), every
        callback's ``on_load_checkpoint`` (the keys its own added; none when it added nothing
        or the checkpoint predates them), then every callback's ``load_state_dict`` (a callback
        without a saved state keeps its own). Each dict also holds Lightning's entries
        (:data:`LIGHTNING_ENTRIES`) taken now: called once the whole restore is done, so they
        are the restored ones."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        trainer, module = self.trainer, self.trainer.lightning_module
        entries = lightning_entries(trainer)
        module.on_load_checkpoint({**entries, **pending.module_checkpoint})
        for callback in self._callbacks():
            if _overrides(callback, "on_load_checkpoint"):
                kept = pending.callback_checkpoints.get(callback.state_key, {})
                added = {
                    key: entries["state_dict"] if _is_module_state_mark(value) else value
                    for key, value in kept.items()
                }
                callback.on_load_checkpoint(trainer, module, {**entries, **added})
        for callback in self._callbacks():
            saved = pending.callbacks.get(callback.state_key)
            if saved:
                callback.load_state_dict(copy.deepcopy(saved))
