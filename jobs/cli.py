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
import sys
from collections.abc import Sequence

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
    with secrets.redacted_output():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipelines import secrets
    from pipelines.config import ConfigError
    from pipelines.sources import InputError
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
