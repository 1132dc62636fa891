"""distckpt: crash-safe, rank-coordinated checkpoints for distributed PyTorch training.

Every rank writes its shard into a staging directory, the ranks agree on the outcome, and rank
0 alone, holding the root's file lock, publishes the checkpoint by an atomic directory rename
and swaps the relative ``last`` / ``best`` links atomically. A crash at any instant leaves the
previous or the new checkpoint under its final name, never a partial one.

Quick use, on every rank::

    import distckpt

    with distckpt.CheckpointManager("runs/exp1", keep_last=3, every_n_steps=100) as mgr:
        tracker = distckpt.StepTracker(optimizer)
        state = {"model": model, "optim": optimizer, "steps": tracker}
        mgr.restore("last", state=state, missing_ok=True)      # resume, if anything is there
        for batch in data:
            ...
            mgr.save(tracker.step, state, metrics={"loss": loss})  # saves when due
"""

from distckpt._version import __version__
from distckpt.errors import (
    CheckpointError,
    CheckpointExists,
    CheckpointNotFound,
    CheckpointVanished,
    CommitLost,
    ConcurrentCommit,
    CoordinationError,
    CoordinationTimeout,
    CorruptCheckpoint,
    GeneratorDeviceMismatch,
    InsufficientSpace,
    InvalidArgument,
    InvalidStep,
    KeyMismatch,
    LauncherGone,
    LeaseLost,
    LeaseTakenMeanwhile,
    LightningInternalMissing,
    ManagerClosed,
    ManifestChecksumMismatch,
    ObjectExists,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    ProcessGroupDestroyed,
    RankFailure,
    ReadOnlyRoot,
    RootInUse,
    RootNotWritable,
    ShapeMismatch,
    StagedFileMismatch,
    StagingRemoved,
    StoreAccessDenied,
    StoreUnavailable,
    UnimportableClass,
    UnloadableState,
    UnrestorableKeys,
    UnsafeCheckpoint,
    UnsupportedTensors,
    UnsupportedVersion,
    WorldSizeMismatch,
)
from distckpt.exporter import export
from distckpt.manager import CheckpointManager
from distckpt.per_rank import PerRank
from distckpt.reader import load_checkpoint
from distckpt.results import Checkpoint, CheckpointInfo, SaveResult
from distckpt.rng import RNGState, capture_rng, restore_rng
from distckpt.steps import StepTracker
from distckpt.verify import CheckpointReport, VerifyReport, verify

__all__ = [
    "__version__",
    "CheckpointManager",
    "StepTracker",
    "load_checkpoint",
    "export",
    "ModelOptimizerState",
    "verify",
    "VerifyReport",
    "CheckpointReport",
    "capture_rng",
    "restore_rng",
    "RNGState",
    "PerRank",
    "Checkpoint",
    "CheckpointInfo",
    "SaveResult",
    "CheckpointError",
    "CheckpointExists",
    "CheckpointNotFound",
    "CheckpointVanished",
    "CommitLost",
    "ConcurrentCommit",
    "CoordinationError",
    "CoordinationTimeout",
    "CorruptCheckpoint",
    "GeneratorDeviceMismatch",
    "InsufficientSpace",
    "InvalidArgument",
    "InvalidStep",
    "KeyMismatch",
    "LauncherGone",
    "LeaseLost",
    "LeaseTakenMeanwhile",
    "LightningInternalMissing",
    "ManagerClosed",
    "ManifestChecksumMismatch",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectStoreError",
    "PreconditionFailed",
    "ProcessGroupDestroyed",
    "RankFailure",
    "ReadOnlyRoot",
    "RootInUse",
    "RootNotWritable",
    "ShapeMismatch",
    "StagedFileMismatch",
    "StagingRemoved",
    "StoreAccessDenied",
    "StoreUnavailable",
    "UnimportableClass",
    "UnloadableState",
    "UnrestorableKeys",
    "UnsupportedTensors",
    "UnsafeCheckpoint",
    "UnsupportedVersion",
    "WorldSizeMismatch",
]


def __getattr__(name: str) -> object:
    # ModelOptimizerState pulls in torch.distributed.checkpoint (about 0.6 s): only on use.
    if name == "ModelOptimizerState":
        from distckpt.model_state import ModelOptimizerState

        return ModelOptimizerState
    raise AttributeError(f"module 'distckpt' has no attribute {name!r}")
