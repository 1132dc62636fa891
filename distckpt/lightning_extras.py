"""What :class:`~distckpt.lightning.DistckptCallback` saves beside the module, optimizers,
schedulers and loops, as Lightning's own checkpoints carry it: every stateful callback's
``state_dict()`` and the keys the module's ``on_save_checkpoint`` adds
(:class:`LightningExtras`), and the Trainer's nested state as ``torch.save`` bytes
(:class:`AsBytes`), for the "dcp" format, which loads back only tensors and the leaves of a
structure given in advance."""

from __future__ import annotations

import copy
import io
from typing import Any

import lightning
import torch
from lightning import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from distckpt.errors import UnloadableState, UnsafeCheckpoint
from distckpt.formats.base import ReadOptions
from distckpt.formats.torch_files import safe_torch_load
from distckpt.state import apply_load, check_load, to_plain


def to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes, what: str) -> Any:
    return safe_torch_load(io.BytesIO(data), ReadOptions(), name=what)


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


def lightning_entries(trainer: Trainer) -> dict[str, Any]:
    """:data:`LIGHTNING_ENTRIES`, as Lightning's ``dump_checkpoint`` fills them."""
    return {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "pytorch-lightning_version": lightning.__version__,
        # The module's own, not the strategy's (which gathers a sharded module on every rank).
        "state_dict": trainer.lightning_module.state_dict(),
    }


def check_loadable(saved: dict[str, bytes], callbacks: dict[str, Any], added: Any) -> None:
    """Raises :class:`~distckpt.UnloadableState` naming the first value of ``saved`` (the
    bytes of ``callbacks`` and ``added``) that a restore would refuse to load, before the save:
    a checkpoint holding one could never be resumed. Cheap: these values are small."""
    try:
        for key in LightningExtras.KEYS:
            from_bytes(saved[key], key)
        return
    except UnsafeCheckpoint:
        pass
    for state_key, state in [*callbacks.items(), ("on_save_checkpoint", added)]:
        try:
            from_bytes(to_bytes(state), state_key)
        except UnsafeCheckpoint as refusal:
            # Its advice (allow_pickle=True) is for loading: not something a resume here takes.
            refused = str(refusal).split(", so it was not loaded")[0]
            what = (
                "the keys the module's on_save_checkpoint added"
                if state_key == "on_save_checkpoint"
                else f"the state_dict() of the callback {state_key!r}"
            )
            raise UnloadableState(
                f"{what} cannot be saved: a resume loads it as torch loads weights (tensors, "
                "numbers, strings, and lists, tuples and dicts of them), which refuses it. "
                f"Save plain values instead (float(x) for a numpy scalar): {refused}",
                state_key=state_key,
                refused=refused,
            ) from None


class LightningExtras:
    """What Lightning's own checkpoints carry besides the module, optimizers, schedulers and
    loops: every stateful callback's ``state_dict()`` keyed by its ``state_key`` (as
    Lightning's ``checkpoint["callbacks"]``; the callbacks in ``skipped`` and empty states left
    out), and the keys the module's ``on_save_checkpoint`` added to its dict.

    Each is saved as ``torch.save`` bytes, one plain value: which callbacks, and which keys a
    hook adds, may differ between the run that saves and the one that resumes, and a restore
    loads into a structure given in advance (the "dcp" format reads only the keys it is given
    and flattens tuples and non-string keys). The bytes come back exactly as saved, and are
    loaded as torch loads weights (tensors and plain containers only)."""

    KEYS = ("callbacks", "module_checkpoint")

    def __init__(self, trainer: Trainer, skipped: tuple[lightning.Callback, ...]) -> None:
        self.trainer = trainer
        self.skipped = skipped
        self.pending_module_checkpoint: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, bytes]:
        callbacks: dict[str, Any] = {}
        for callback in self.trainer.callbacks:
            if any(callback is skipped for skipped in self.skipped):
                continue
            state = callback.state_dict()
            if state:
                callbacks[callback.state_key] = state
        # The hook reads Lightning's cheap entries as it would in Lightning's own checkpoint
        # (rewriting ``checkpoint["state_dict"]`` is a common idiom); only what it adds is
        # saved: the module and the loops are saved from themselves.
        module_checkpoint = lightning_entries(self.trainer)
        self.trainer.lightning_module.on_save_checkpoint(module_checkpoint)
        added = {
            key: value for key, value in module_checkpoint.items() if key not in LIGHTNING_ENTRIES
        }
        saved = {"callbacks": to_bytes(callbacks), "module_checkpoint": to_bytes(added)}
        check_loadable(saved, callbacks, added)
        return saved

    def load_state_dict(self, state: dict[str, bytes]) -> None:
        """Loads each saved callback state into the callback of the same ``state_key`` and
        hands the module's dict to its ``on_load_checkpoint``, as Lightning's own restore
        does: a saved state whose callback is gone is warned about, and a callback without a
        saved state keeps its own."""
        callbacks: dict[str, Any] = from_bytes(state["callbacks"], "the callbacks' states")
        module_checkpoint: dict[str, Any] = from_bytes(
            state["module_checkpoint"], "the module's on_save_checkpoint dict"
        )
        present = {callback.state_key for callback in self.trainer.callbacks}
        gone = sorted(set(callbacks) - present)
        if gone:
            rank_zero_warn(
                "The checkpoint holds the state of callbacks this Trainer does not have: pass "
                f"the callbacks it was saved with to resume them. Missing: {gone}"
            )
        self.pending_module_checkpoint = module_checkpoint
        for callback in self.trainer.callbacks:
            saved = callbacks.get(callback.state_key)
            if saved and not any(callback is skipped for skipped in self.skipped):
                callback.load_state_dict(copy.deepcopy(saved))

    def call_module_on_load(self) -> None:
        """Calls the module's ``on_load_checkpoint`` with the keys its ``on_save_checkpoint``
        added, if a restore loaded them, and Lightning's entries (:data:`LIGHTNING_ENTRIES`)
        taken now: called once the whole restore is done, so they are the restored ones."""
        added, self.pending_module_checkpoint = self.pending_module_checkpoint, None
        if added is not None:
            self.trainer.lightning_module.on_load_checkpoint(
                {**lightning_entries(self.trainer), **added}
            )


class ExtrasTemplate:
    """What a restore loads :class:`LightningExtras` through: its ``state_dict()`` has the
    saved keys without calling the callbacks' and the module's hooks, which run at saves."""

    def __init__(self, extras: LightningExtras) -> None:
        self.extras = extras

    def state_dict(self) -> dict[str, bytes]:
        return dict.fromkeys(LightningExtras.KEYS, b"")

    def load_state_dict(self, state: dict[str, bytes]) -> None:
        self.extras.load_state_dict(state)
