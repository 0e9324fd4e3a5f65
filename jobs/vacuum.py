"""`psp vacuum OUTPUT`: compact the output table's small files and delete the files no version
within the retention needs (crashed runs' files, replaced rows' old files)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from pipelines.options import add_arguments, from_args, option, shared
from pipelines.table import vacuum


@dataclass
class VacuumOptions:
    """`psp vacuum OUTPUT`'s options."""

    retention_hours: int = option(
        168, "keep files younger than this (default 168 = 7 days): runs still in flight and time travel "
        "(--as-of) within it keep working; 0 deletes everything unreferenced", parse=int, minimum=0,
        scope="vacuum")
    no_compact: bool = option(False, "only delete, do not compact", kind="flag", scope="vacuum")
    dry_run: bool = option(False, "list the files that would be deleted", kind="flag", scope="vacuum")
    storage_options: dict[str, Any] | None = shared("storage_options", scope="vacuum")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``psp vacuum`` to the `psp` CLI's subparsers."""
    p = subparsers.add_parser("vacuum", help="compact small files, delete files of crashed runs and old versions",
                              description=__doc__)
    p.add_argument("output", metavar="OUTPUT")
    add_arguments(p, VacuumOptions, scopes=("vacuum",))
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    o = from_args(VacuumOptions, args)
    result = vacuum(args.output, o.storage_options, retention_hours=o.retention_hours,
                    compact=not o.no_compact, dry_run=o.dry_run)
    compacted = {k: result.compacted.get(k) for k in ("numFilesAdded", "numFilesRemoved")} if result.compacted else {}
    print(json.dumps({"version": result.version, "compacted": compacted,
                      "deleted" if not o.dry_run else "would_delete": result.deleted_files}, indent=2))
    return 0
