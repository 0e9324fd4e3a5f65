"""The `psp` command line. Each command lives in its own module, which registers its subcommand:

    invert / frontalize  jobs.invert    inputs -> one row each in the output Delta table
    demo                 jobs.demo      the pipeline on generated samples with a random-weight checkpoint
    inspect              jobs.inspect   counts, runs, schema and rows of an output table (--as-of)
    nightly              jobs.nightly   only new or changed inputs, one commit
    vacuum               jobs.vacuum    compact the table, delete files no version needs
    submit / jobs        jobs.submit    run a command on a Ray cluster (Ray Jobs API)
    edit / direction     jobs.edit      latent editing in bulk; fit a direction from labels
    report               jobs.report    one self-contained HTML report of an output table
    train                jobs.train     train a pSp encoder on the cluster (Ray Train)

Misconfiguration exits with status 2 and a message that says what to do, before Ray does any work.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence

from jobs import demo, edit, inspect, invert, nightly, report, submit, train, vacuum
from jobs.invert import add_run_options, config_from_args, run_config  # noqa: F401 - the CLI's public helpers

COMMANDS = (invert, demo, inspect, nightly, vacuum, submit, edit, report, train)


def build_parser() -> argparse.ArgumentParser:
    """The `psp` parser: each command module registers its own subcommand(s)."""
    parser = argparse.ArgumentParser(prog="psp", description="pSp face inversion at scale, on Ray Data")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `psp` console script; returns the exit code.

    Everything it prints, logs or lets escape is redacted (`pipelines.secrets`), and `env:NAME`
    values in --storage-options are resolved here, where the command runs.
    """
    from pipelines import secrets

    secrets.install_log_redaction()
    sys.excepthook = secrets.redacting_excepthook
    with without_ray_noise(), secrets.redacted_output():
        return _main(argv)


# Lines Ray's C++ core worker writes straight to this process's stderr that say nothing about the
# run: every Ray Data actor pool is created with its operator's arguments in the object store
# (ray-project/ray#57733), so each run printed "Actor ... has constructor arguments in the object
# store and max_restarts > 0" once. (Our actors' restarts are tested in tests/test_faults.py.)
RAY_NOISE = (b"has constructor arguments in the object store and max_restarts > 0",)


@contextlib.contextmanager
def without_ray_noise(noise: Sequence[bytes] = RAY_NOISE) -> Iterator[None]:
    """Within the block, lines containing any of `noise` are dropped from file descriptor 2 (where
    C++ libraries write, past sys.stderr); everything else passes through unchanged, in order."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError):  # no stderr to filter
        yield
        return
    os.dup2(write_end, 2)
    os.close(write_end)
    out = os.dup(saved)

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as src, os.fdopen(out, "wb", buffering=0) as dst:
            pending = b""
            while chunk := src.read(1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if not any(n in line for n in noise):
                        dst.write(line + b"\n")
            if pending:
                dst.write(pending)

    thread = threading.Thread(target=pump, name="psp-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer gone: the pump reads to its end and stops
        os.close(saved)
        thread.join(timeout=10)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag refused by its declaration (2, message printed)
        return e.code if isinstance(e.code, int) else 2
    from pipelines import secrets
    from pipelines.config import ConfigError
    from pipelines.items import InputError
    from pipelines.table import ConcurrentRunError

    try:
        if getattr(args, "storage_options", None):
            args.storage_options = secrets.resolve_env_refs(args.storage_options)
            secrets.remember(args.storage_options)
        return int(args.func(args) or 0)
    except (ConfigError, InputError) as e:
        print(f"psp {args.command}: {secrets.redact(str(e))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConcurrentRunError) as e:
        print(f"psp {args.command}: {secrets.redact(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
