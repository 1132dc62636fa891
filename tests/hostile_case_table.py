"""Damaged and hostile checkpoint roots: one table of cases, and what distckpt must do with each.

Every case starts from a fresh root made by :func:`tests.hostile_cases.make_root` (two committed
checkpoints, steps 1 and 2, ``last`` -> step 2), damages it (with a damage of
``tests/hostile_cases.py``), and states the expected outcome of

* ``distckpt.verify(root)``: which checkpoint is reported broken (or, under :data:`LINKS`, the
  root's links), with substrings its problem message must contain: always the file it is about;
* ``mgr.restore("last")`` and ``mgr.restore("last", verify=True)``: which step is loaded, with
  which warning, or which exception is raised;
* restoring the damaged thing explicitly: a step number, or a path inside the root;
* ``distckpt.export`` of that same checkpoint (a step's dir for a step number), which checks
  checksums by default: as the explicit restore with ``verify=True``, writing what it loads;
* whether a restarted job (a manager that can write) sets step 2 aside as damaged when its
  ``restore("last", verify=True)`` skips it.

``tests/test_verify.py`` asserts every line of the table; ``scripts/gen_verification_table.py``
renders it into ``docs/verification.md``, so the doc says exactly what the tests check.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from distckpt.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    ManifestChecksumMismatch,
    UnsafeCheckpoint,
    UnsupportedVersion,
)
from distckpt.layout import step_dir_name
from tests.hostile_cases import (
    LINKS,
    MANIFEST,
    RANK0,
    STEP2,
    add_extra_file,
    best_missing,
    deeply_nested_manifest,
    edit_manifest,
    flip_byte,
    huge_garbage_manifest,
    last_absolute_symlink,
    last_pointer_escape,
    last_relative_escape,
    malicious_pickle,
    manifest_extra_file_field,
    manifest_extra_top_level_field,
    manifest_flipped_bit,
    manifest_future_version,
    manifest_lists_absolute,
    manifest_lists_nul_name,
    manifest_lists_parent,
    manifest_names_step_1,
    manifest_not_json,
    manifest_unknown_checksum,
    manifest_unknown_format,
    remove_manifest,
    remove_rank_file,
    shard_symlink,
    step_dir_symlink,
    truncate_shard,
    unlist_rank_file,
)

# ---------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Outcome:
    """What one restore call must do: load ``step`` (with ``warning``, whose substrings one
    logged warning must all contain; None: no warning at all), or raise ``raises`` (exactly
    that class) with a message containing every one of ``says``."""

    step: int | None = None
    warning: tuple[str, ...] | None = None
    intact: bool = True
    raises: type[Exception] | None = None
    says: tuple[str, ...] = ()

    def describe(self, verb: str = "loads") -> str:
        """The outcome in words; ``verb``: what a call that succeeds does with the step."""
        if self.raises is not None:
            text = f"raises `{self.raises.__name__}`"
            return text + (f" ({_quote(self.says)})" if self.says else "")
        text = f"{verb} step {self.step}"
        if not self.intact:
            text += " **with wrong values**"
        if self.warning is None:
            return text + (", silently" if not self.intact else "")
        return f"{text}, warning {_quote(self.warning)}"


def loads(step: int, *warning: str, intact: bool = True) -> Outcome:
    """Loads ``step``; with no ``warning`` substrings, logs no warning."""
    return Outcome(step=step, warning=tuple(warning) if warning else None, intact=intact)


def raises(exc: type[Exception], *says: str) -> Outcome:
    return Outcome(raises=exc, says=says)


@dataclass(frozen=True)
class Case:
    """One damaged root and everything distckpt must do with it (see the module doc)."""

    id: str
    description: str
    damage: Callable[[Path], None]
    #: checkpoint dir name (or :data:`LINKS`) -> substrings of one of its problems; every
    #: checkpoint not named here must pass, and the root have no problem unless LINKS is named
    verify: Mapping[str, tuple[str, ...]]
    last: Outcome
    #: explicit restore: a step number, or a path relative to the root
    target: int | str
    explicit: Outcome
    #: restore("last", verify=True); None: as ``last``
    last_verified: Outcome | None = None
    #: the explicit restore with verify=True; None: as ``explicit``
    explicit_verified: Outcome | None = None
    #: a remark for the docs table
    notes: str = ""
    #: whether a restarted job's restore("last", verify=True) sets step 2 aside as damaged
    #: (renamed to ``damaged-step-00000002-<token>``): only for damage this version is sure of
    set_aside: bool = False

    @property
    def last_checked(self) -> Outcome:
        return self.last_verified or self.last

    @property
    def explicit_checked(self) -> Outcome:
        return self.explicit_verified or self.explicit

    def target_text(self) -> str:
        if isinstance(self.target, int):
            return f"restore({self.target})"
        return f'restore(root / "{self.target}")'

    @property
    def export_target(self) -> str:
        """What :func:`distckpt.export` is given, relative to the root: the explicit
        target, a step number as its step's dir."""
        return step_dir_name(self.target) if isinstance(self.target, int) else self.target


def off_schema_case(case_id: str, key: str, value: object) -> Case:
    """A case whose step 2 manifest holds ``value`` under the known ``key``, a type or value no
    version writes there: damage, skipped and set aside like any other."""

    def damage(root: Path) -> None:
        edit_manifest(root / STEP2, lambda data: data.update({key: value}))

    where, why = f"{STEP2}/{MANIFEST}", f"'{key}'"
    return Case(
        id=case_id,
        set_aside=True,
        description=f"`{where}` says `{key}: {json.dumps(value)}`",
        damage=damage,
        verify={STEP2: (where, "manifest schema", why)},
        last=loads(1, where, "manifest schema", why),
        target=2,
        explicit=raises(CorruptCheckpoint, where, why),
    )


def _quote(parts: tuple[str, ...]) -> str:
    return " … ".join(f"`{part}`" for part in parts)


CASES: list[Case] = [
    Case(
        id="truncated-shard",
        set_aside=True,
        description=f"`{STEP2}/{RANK0}` cut to half its size",
        damage=truncate_shard,
        verify={STEP2: (f"{STEP2}/{RANK0}", "truncated")},
        last=loads(1, f"{STEP2}/{RANK0}", "truncated"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{RANK0}", "truncated"),
    ),
    Case(
        id="flipped-byte",
        set_aside=True,
        description=f"one byte of tensor data in `{STEP2}/{RANK0}` flipped (same size)",
        damage=flip_byte,
        verify={STEP2: (f"{STEP2}/{RANK0}", "checksum mismatch")},
        last=loads(2, intact=False),
        last_verified=loads(1, f"{STEP2}/{RANK0}", "checksum mismatch"),
        target=2,
        explicit=loads(2, intact=False),
        explicit_verified=raises(CorruptCheckpoint, f"{STEP2}/{RANK0}", "checksum mismatch"),
        notes="only a checksum can tell: torch loads the altered value without complaint",
    ),
    Case(
        id="missing-manifest",
        set_aside=True,
        description=f"`{STEP2}/{MANIFEST}` deleted",
        damage=remove_manifest,
        verify={STEP2: (STEP2, f"no {MANIFEST}")},
        last=loads(1, STEP2, f"no {MANIFEST}"),
        target=2,
        explicit=raises(CorruptCheckpoint, STEP2, f"no {MANIFEST}"),
    ),
    Case(
        id="manifest-not-json",
        set_aside=True,
        description=f"`{STEP2}/{MANIFEST}` cut short (not valid JSON)",
        damage=manifest_not_json,
        verify={STEP2: (f"{STEP2}/{MANIFEST}", "not valid JSON")},
        last=loads(1, f"{STEP2}/{MANIFEST}", "not valid JSON"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{MANIFEST}", "not valid JSON"),
    ),
    Case(
        id="manifest-future-version",
        description=f"`{STEP2}/{MANIFEST}` says `format_version: 999`",
        damage=manifest_future_version,
        verify={STEP2: (f"{STEP2}/{MANIFEST}", "format version 999")},
        last=raises(UnsupportedVersion, f"{STEP2}/{MANIFEST}", "upgrade distckpt"),
        target=2,
        explicit=raises(UnsupportedVersion, f"{STEP2}/{MANIFEST}", "upgrade distckpt"),
        notes="not skipped: a newer checkpoint is not damage, so the answer is to upgrade",
    ),
    Case(
        id="manifest-flipped-bit",
        set_aside=True,
        description=f"one bit of `{STEP2}/{MANIFEST}` flipped: `format_version` 2 reads 3",
        damage=manifest_flipped_bit,
        verify={STEP2: (f"{STEP2}/{MANIFEST}", "checksum mismatch of the manifest")},
        last=loads(1, f"{STEP2}/{MANIFEST}", "checksum mismatch of the manifest"),
        target=2,
        explicit=raises(ManifestChecksumMismatch, f"{STEP2}/{MANIFEST}", "checksum mismatch"),
        notes="the manifest's own checksum finds it; unchecked, it read as a newer version, "
        "which every restore refused",
    ),
    Case(
        id="missing-rank-file",
        set_aside=True,
        description=f"`{STEP2}/{RANK0}` deleted",
        damage=remove_rank_file,
        verify={STEP2: (f"{STEP2}/{RANK0}", "missing")},
        last=loads(1, f"{STEP2}/{RANK0}", "missing"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{RANK0}", "missing"),
    ),
    Case(
        id="rank-file-unlisted",
        set_aside=True,
        description=f"`{RANK0}` removed from `{STEP2}/{MANIFEST}` (the file stays)",
        damage=unlist_rank_file,
        verify={STEP2: (f"{STEP2}/{RANK0}", "required by the 'torch' format")},
        last=loads(1, f"{STEP2}/{RANK0}", "required"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{RANK0}", "required"),
        notes="the file is unchecked by the manifest, so it must not be loaded",
    ),
    off_schema_case("manifest-no-ranks", "world_size", 0),
    off_schema_case("manifest-negative-epoch", "epoch", -2),
    off_schema_case("manifest-metadata-list", "metadata", [1]),
    off_schema_case("manifest-created-number", "created_utc", 5),
    Case(
        id="extra-file",
        description=f"an unlisted `{STEP2}/notes.txt` added",
        damage=add_extra_file,
        verify={STEP2: (f"{STEP2}/notes.txt", "unexpected file")},
        last=loads(2),
        target=2,
        explicit=loads(2),
        notes="harmless to a restore (nothing reads it); verify reports it",
    ),
    Case(
        id="manifest-names-other-step",
        set_aside=True,
        description=f"`{STEP2}/{MANIFEST}` says `step: 1`",
        damage=manifest_names_step_1,
        verify={STEP2: (f"{STEP2}/{MANIFEST}", "names step 1")},
        last=loads(1, f"{STEP2}/{MANIFEST}", "names step 1"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{MANIFEST}", "names step 1"),
    ),
    Case(
        id="manifest-lists-parent-path",
        set_aside=True,
        description=f"`{STEP2}/{MANIFEST}` also lists `../x` (which exists, size and crc match)",
        damage=manifest_lists_parent,
        verify={STEP2: (f"{STEP2}/{MANIFEST}", "outside its directory", "../x")},
        last=loads(1, f"{STEP2}/{MANIFEST}", "outside its directory"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{MANIFEST}", "outside its directory"),
    ),
    Case(
        id="manifest-lists-absolute-path",
        set_aside=True,
        description=f"`{STEP2}/{MANIFEST}` also lists an absolute path to a real file",
        damage=manifest_lists_absolute,
        verify={STEP2: (f"{STEP2}/{MANIFEST}", "outside its directory", "elsewhere.bin")},
        last=loads(1, f"{STEP2}/{MANIFEST}", "outside its directory"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{MANIFEST}", "outside its directory"),
    ),
    Case(
        id="manifest-lists-nul-name",
        set_aside=True,
        description=f"`{STEP2}/{MANIFEST}` also lists a name with a NUL byte (`rank\\u0000.pt`)",
        damage=manifest_lists_nul_name,
        verify={STEP2: (f"{STEP2}/{MANIFEST}",)},
        last=loads(1, f"{STEP2}/{MANIFEST}"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{MANIFEST}"),
    ),
    Case(
        id="manifest-unknown-checksum",
        description=f'`{STEP2}/{MANIFEST}` says `checksum_algorithm: "md4"`',
        damage=manifest_unknown_checksum,
        verify={STEP2: (f"{STEP2}/{MANIFEST}", "unknown checksum algorithm")},
        last=loads(2),
        last_verified=loads(1, f"{STEP2}/{MANIFEST}", "unknown checksum algorithm"),
        target=2,
        explicit=loads(2),
        explicit_verified=raises(
            CorruptCheckpoint, f"{STEP2}/{MANIFEST}", "unknown checksum algorithm"
        ),
        notes="sizes still match, so only verify=True refuses what it cannot check",
    ),
    Case(
        id="manifest-unknown-format",
        description=f'`{STEP2}/{MANIFEST}` says `format: "pickle-jar"`',
        damage=manifest_unknown_format,
        verify={STEP2: (f"{STEP2}/{MANIFEST}", "unknown checkpoint format")},
        last=loads(1, f"{STEP2}/{MANIFEST}", "unknown checkpoint format"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{MANIFEST}", "unknown checkpoint format"),
        notes="restore's check must agree with verify's: a dir verify calls broken is skipped",
    ),
    Case(
        id="manifest-extra-file-field",
        description=f"every file record in `{STEP2}/{MANIFEST}` gains `mtime_ns: 123`",
        damage=manifest_extra_file_field,
        verify={},
        last=loads(2),
        target=2,
        explicit=loads(2),
        notes="a newer writer's field: ignored, as at the top level, never damage",
    ),
    Case(
        id="manifest-extra-top-level-field",
        description=f"`{STEP2}/{MANIFEST}` gains a top-level `compression: null`",
        damage=manifest_extra_top_level_field,
        verify={},
        last=loads(2),
        target=2,
        explicit=loads(2),
        notes="a newer writer's field: ignored, never damage",
    ),
    Case(
        id="huge-garbage-manifest",
        set_aside=True,
        description=f"`{STEP2}/{MANIFEST}` replaced by 32 MiB of random bytes",
        damage=huge_garbage_manifest,
        verify={STEP2: (f"{STEP2}/{MANIFEST}", "not valid JSON")},
        last=loads(1, f"{STEP2}/{MANIFEST}", "not valid JSON"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{MANIFEST}", "not valid JSON"),
    ),
    Case(
        id="deeply-nested-manifest",
        set_aside=True,
        description=f"`{STEP2}/{MANIFEST}` is 200,000 nested JSON arrays",
        damage=deeply_nested_manifest,
        verify={STEP2: (f"{STEP2}/{MANIFEST}",)},
        last=loads(1, f"{STEP2}/{MANIFEST}"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{MANIFEST}"),
    ),
    Case(
        id="last-absolute-symlink",
        description="`last` replaced by a symlink to the absolute path of another root's step 2",
        damage=last_absolute_symlink,
        verify={LINKS: ("/last", "points outside the root")},
        last=loads(2, "/last", "outside the root"),
        target="last",
        explicit=loads(2, "/last", "outside the root"),
    ),
    Case(
        id="last-relative-escape",
        description=f"`last` replaced by a symlink to `../other/{STEP2}`",
        damage=last_relative_escape,
        verify={LINKS: ("/last", "points outside the root", f"../other/{STEP2}")},
        last=loads(2, "/last", "outside the root"),
        target="last",
        explicit=loads(2, "/last", "outside the root"),
    ),
    Case(
        id="last-pointer-escape",
        description=f"`last` replaced by a pointer file naming `../other/{STEP2}`",
        damage=last_pointer_escape,
        verify={LINKS: ("/last", "points outside the root", f"../other/{STEP2}")},
        last=loads(2, "/last", "outside the root"),
        target="last",
        explicit=loads(2, "/last", "outside the root"),
    ),
    Case(
        id="best-missing-dir",
        description="`best` added, a symlink to `step-00000007`, which does not exist",
        damage=best_missing,
        verify={LINKS: ("/best", "step-00000007", "does not exist")},
        last=loads(2),
        target="best",
        explicit=raises(CheckpointNotFound, "/best", "step-00000007"),
    ),
    Case(
        id="shard-symlink",
        description=f"`{STEP2}/{RANK0}` replaced by a symlink to an identical file elsewhere",
        damage=shard_symlink,
        verify={STEP2: (f"{STEP2}/{RANK0}", "symlink")},
        last=loads(1, f"{STEP2}/{RANK0}", "symlink"),
        target=2,
        explicit=raises(CorruptCheckpoint, f"{STEP2}/{RANK0}", "symlink"),
    ),
    Case(
        id="step-dir-symlink",
        description=f"`{STEP2}` replaced by a symlink to another root's (valid) `{STEP2}`",
        damage=step_dir_symlink,
        verify={STEP2: (STEP2, "symlink")},
        last=loads(1, f"{STEP2}", "symlink"),
        target=STEP2,
        explicit=raises(UnsafeCheckpoint, STEP2, "symlink"),
        notes="a symlinked dir is not a committed step: `restore(2)` raises `CheckpointNotFound`",
    ),
    Case(
        id="malicious-pickle",
        description=(
            f"`{STEP2}/{RANK0}` rewritten by `torch.save` with an object whose `__reduce__` "
            "creates a file; the manifest resealed to match"
        ),
        damage=malicious_pickle,
        verify={},
        last=raises(UnsafeCheckpoint, f"{STEP2}/{RANK0}", "allow_pickle=True", "add_safe_globals"),
        target=2,
        explicit=raises(
            UnsafeCheckpoint, f"{STEP2}/{RANK0}", "allow_pickle=True", "add_safe_globals"
        ),
        notes="verify unpickles nothing, so a consistent forgery passes it; no load runs it",
    ),
]

CASES_BY_ID = {case.id: case for case in CASES}
assert len(CASES_BY_ID) == len(CASES), "case ids must be unique"
