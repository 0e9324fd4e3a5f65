"""`psp vacuum OUTPUT`: compact the output table's small files and delete the files no version
within the retention needs (crashed runs' files, replaced rows' old files)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipelines.options import parse_json_object
from pipelines.table import vacuum


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``psp vacuum`` to the `psp` CLI's subparsers."""
    p = subparsers.add_parser("vacuum", help="compact small files, delete files of crashed runs and old versions",
                              description=__doc__)
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("--retention-hours", type=int, default=168,
                   help="keep files younger than this (default 168 = 7 days): runs still in flight and "
                        "time travel (--as-of) within it keep working; 0 deletes everything unreferenced")
    p.add_argument("--no-compact", dest="compact", action="store_false", help="only delete, do not compact")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be deleted")
    p.add_argument("--storage-options", type=parse_json_object, default=None)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if args.retention_hours < 0:
        print("psp vacuum: --retention-hours must be >= 0", file=sys.stderr)
        return 2
    result = vacuum(args.output, args.storage_options, retention_hours=args.retention_hours,
                    compact=args.compact, dry_run=args.dry_run)
    compacted = {k: result.compacted.get(k) for k in ("numFilesAdded", "numFilesRemoved")} if result.compacted else {}
    print(json.dumps({"version": result.version, "compacted": compacted,
                      "deleted" if not args.dry_run else "would_delete": result.deleted_files}, indent=2))
    return 0
