"""Which record files of one or more run folders a reader may count: every file is checked
against its seal (pipeline.store.seal) and each unit is read once.

A file that fails (truncated, corrupted, foreign, another schema) is refused by name
(BadFileError) unless the caller skips bad files, and then it is listed. Two files holding the
same unit (its id in the footer: a copy beside the original, or the same run given twice or
copied to another folder) count once: the first folder's, there the file under the unit's own
name (`unit-{id}.parquet`); the others are listed.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.errors import BadFileError
from pipeline.store.io import Store

RECORDS = "records"


@dataclass
class Verified:
    """The outcome for a set of run folders.

    files: (store, rel) of every file to read, one per unit.
    bad: {file URI: why it fails}. duplicates: {file URI left out: the URI read instead}.
    """

    files: list[tuple[Store, str]] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    duplicates: dict[str, str] = field(default_factory=dict)

    def notes(self) -> list[str]:
        """One line per file left out, for the person reading the output."""
        return ([f"skipped {uri}: {why}" for uri, why in self.bad.items()]
                + [f"read once: {uri} holds the same unit as {kept}" for uri, kept in self.duplicates.items()])

    def refuse_bad(self) -> None:
        """BadFileError naming every bad file (the first 10 in the message, all in `.files`)."""
        if not self.bad:
            return
        items = list(self.bad.items())
        shown = "; ".join(f"{uri} ({why})" for uri, why in items[:10])
        more = f"; and {len(items) - 10} more" if len(items) > 10 else ""
        raise BadFileError(f"{len(items)} record file(s) fail their checks: {shown}{more}. Delete or move them "
                           f"(a rerun of the job redoes their units), or pass --skip-bad to go on without them",
                           self.bad)


def verify_runs(stores: Sequence[Store], *, skip_bad: bool = False) -> Verified:
    """Check every Parquet file under each store's records/ (see the module docstring).

    skip_bad: leave bad files out (listed in `.bad`) instead of raising BadFileError.
    """
    out = Verified()
    kept: dict[str, str] = {}  # unit id -> URI of the file read for it
    for store in stores:
        rels = store.list(RECORDS, ".parquet")
        good = []
        for rel, (reason, footer) in store.check(rels, keep=True).items():
            if reason is not None:
                out.bad[store.join(rel)] = reason
            else:
                good.append((rel, footer.get("unit_id") or store.join(rel)))  # no unit id: counts on its own
        # The file under the unit's own name first, so that a copy beside it is the one left out.
        good.sort(key=lambda g: (posixpath.basename(g[0]) != f"unit-{g[1]}.parquet", g[0]))
        for rel, unit in good:
            uri = store.join(rel)
            if unit in kept:
                out.duplicates[uri] = kept[unit]
                continue
            kept[unit] = uri
            out.files.append((store, rel))
    if not skip_bad:
        out.refuse_bad()
    return out
