"""`python -m schemas export` rewrites the committed JSON exports; `python -m schemas check` fails
(exit 1) when a committed export differs from what the code generates.

Each module in this package may define `JSON_EXPORTS = {"file.json": callable_returning_dict}`;
the files live next to the modules.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

import schemas

HERE = Path(schemas.__file__).parent


def collect_exports() -> dict[str, dict]:
    """{filename: generated JSON dict} over every `JSON_EXPORTS` in the package's modules."""
    out: dict[str, dict] = {}
    for info in sorted(pkgutil.iter_modules(schemas.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"schemas.{info.name}")
        for filename, build in getattr(module, "JSON_EXPORTS", {}).items():
            out[filename] = build()
    return out


def render(doc: dict) -> str:
    """The exact text written for an export (stable key order, trailing newline)."""
    return json.dumps(doc, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas", description=__doc__)
    parser.add_argument("command", choices=["export", "check"])
    args = parser.parse_args(argv)
    stale = []
    for filename, doc in collect_exports().items():
        path = HERE / filename
        text = render(doc)
        if args.command == "export":
            path.write_text(text)
            print(f"wrote {path}")
        elif not path.exists() or path.read_text() != text:
            stale.append(filename)
    if stale:
        print(f"stale schema exports {stale}: run `python -m schemas export` and commit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
