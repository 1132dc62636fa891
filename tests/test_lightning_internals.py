"""The private attributes of Lightning that distckpt.lightning uses exist in the installed
Lightning, and one missing is named as such (distckpt.LightningInternalMissing)."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")

import lightning

import distckpt
from distckpt.lightning_internals import internal, set_internal
from tests.lightning_callbacks_job import ONE_QUIET_DEVICE


def test_every_private_attribute_used_exists_in_the_installed_lightning() -> None:
    trainer = lightning.Trainer(**ONE_QUIET_DEVICE)
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    used = [
        (internal(trainer, "_signal_connector"), "received_sigterm"),
        (fit_loop, "_data_fetcher"),
        (fit_loop, "_combined_loader"),
        (fit_loop, "_combined_loader_states_to_load"),
        (epoch_loop, "_skip_next_val"),
        (epoch_loop, "_should_check_val_fx"),
        (epoch_loop, "scheduler_progress"),
        (epoch_loop.automatic_optimization, "optim_progress"),
        (lightning.pytorch.utilities.combined_loader.CombinedLoader, "_load_state_dicts"),
        (lightning.pytorch.utilities.combined_loader, "_Stateful"),
        (lightning.fabric.utilities.data, "_set_sampler_epoch"),
    ]
    for owner, name in used:
        internal(owner, name)


def test_a_missing_private_attribute_names_it_and_the_lightning_version() -> None:
    fit_loop = lightning.Trainer(**ONE_QUIET_DEVICE).fit_loop
    with pytest.raises(distckpt.LightningInternalMissing) as raised:
        set_internal(fit_loop, "_no_such_attribute", None)
    assert raised.value.attribute == "_FitLoop._no_such_attribute"
    assert raised.value.lightning_version == lightning.__version__
    assert isinstance(raised.value, AttributeError)
    assert not hasattr(fit_loop, "_no_such_attribute")  # not set silently


def test_a_missing_private_attribute_of_a_module_or_class_names_it() -> None:
    module = lightning.pytorch.utilities.combined_loader
    with pytest.raises(distckpt.LightningInternalMissing) as raised:
        internal(module, "_no_such_attribute")
    assert raised.value.attribute == f"{module.__name__}._no_such_attribute"
    with pytest.raises(distckpt.LightningInternalMissing) as raised:
        internal(module.CombinedLoader, "_no_such_attribute")
    assert raised.value.attribute == "CombinedLoader._no_such_attribute"
