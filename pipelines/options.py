"""Each option of a run is declared once: a dataclass field whose metadata carries its help text,
flag, choices, bounds and the check of the code it protects. The command line (`add_arguments`),
the config built from it (`from_args`) and the fail-fast validation (`check_options`) are all
generated from that declaration, so a value the CLI or the resolver accepts is one the stage
accepts too.

    @dataclass
    class RunOptions:
        batch_size: int | None = option(None, "rows per model batch", parse=int, minimum=1)

`pipelines.config.InvertConfig` is the options object of `psp invert`, `frontalize` and `nightly`;
every other command declares its own the same way (`pipelines.edit.EditConfig`, `DirectionConfig`,
`jobs.inspect.InspectOptions`, ...). An option several commands share (`--storage-options`,
`--run-id`, `--device`, `--images`, ...) is declared once, in `SHARED`, and used with `shared(name)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from schemas.outputs import IMAGE_FORMATS


class ConfigError(ValueError):
    """A run that cannot start as configured; the message says what to change."""


@dataclass(frozen=True)
class Option:
    """How one config field appears on the command line and what values it accepts.

    help: the --help text. flag: the command-line flag (default `--field-name`); None with
    `cli=False` for library-only fields. parse: text -> value (default str). choices / minimum /
    maximum: accepted values. check: the protected code's own check, `check(value)` raising
    ValueError (its message is shown after the flag). scope: "run" (every pipeline command) or
    "invert" (one-off runs only). kind: "value", "flag" (store_true), "switch" (--x/--no-x, None
    when absent) or "append" (repeatable, a list; `check` sees each value and the whole list).
    required: the flag must be given.
    """

    help: str
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    check: Callable[[Any], Any] | None = None
    metavar: str | None = None
    scope: str | tuple[str, ...] = "run"
    kind: str = "value"
    required: bool = False
    cli: bool = True
    short: str | None = None


def option(default: Any = None, help: str = "", **meta: Any) -> Any:
    """A dataclass field declared as an option (see `Option` for `meta`)."""
    return dataclasses.field(default=default, metadata={"option": Option(help=help, **meta)})


def declared(cls: type) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of `cls` declared with `option(...)`, in declaration order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def flag_of(field: dataclasses.Field, opt: Option) -> str:
    return opt.flag or "--" + field.name.replace("_", "-")


def _scopes_of(opt: Option) -> set[str]:
    return {opt.scope} if isinstance(opt.scope, str) else set(opt.scope)


def check_value(field: dataclasses.Field, opt: Option, value: Any) -> Any:
    """Validate one value against its declaration; returns it (ConfigError names the flag)."""
    if value is None or opt.kind in ("flag", "switch"):
        return value
    flag = flag_of(field, opt)
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{flag} {value!r}: expected one of {', '.join(map(str, opt.choices))}")
    if opt.minimum is not None or opt.maximum is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag} {value!r}: expected a number")
        if opt.minimum is not None and value < opt.minimum:
            raise ConfigError(f"{flag} {value!r}: expected a value >= {opt.minimum:g}")
        if opt.maximum is not None and value > opt.maximum:
            raise ConfigError(f"{flag} {value!r}: expected a value <= {opt.maximum:g}")
    if opt.check is not None:
        try:
            opt.check(value)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{flag} {value!r}: {e}") from None
    return value


def check_options(config: Any) -> None:
    """Run every declared check on a config object (what the CLI would have refused)."""
    for field, opt in declared(type(config)):
        check_value(field, opt, getattr(config, field.name))


def _argparse_type(field: dataclasses.Field, opt: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = (opt.parse or str)(text)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e) or f"invalid value {text!r}") from None
        try:
            return check_value(field, opt, value)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = field.name  # argparse names the type in its messages
    return parse


def _metavar(field: dataclasses.Field, opt: Option) -> str:
    if opt.metavar:
        return opt.metavar
    if opt.choices is not None:
        return "{" + ",".join(map(str, opt.choices)) + "}"
    return {int: "N", float: "X", parse_json_object: "JSON"}.get(opt.parse, field.name.upper())


def add_arguments(parser: argparse.ArgumentParser, cls: type, scopes: Iterable[str] = ("run",)) -> None:
    """Add the flags of `cls`'s options whose scope is in `scopes` to `parser`."""
    scopes = set(scopes)
    for field, opt in declared(cls):
        if not opt.cli or not _scopes_of(opt) & scopes:
            continue
        flags = [opt.short, flag_of(field, opt)] if opt.short else [flag_of(field, opt)]
        if opt.kind == "flag":
            parser.add_argument(*flags, dest=field.name, action="store_true", help=opt.help)
        elif opt.kind == "switch":
            parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=None, help=opt.help)
        elif opt.kind == "append":  # repeatable: a list of values, None when absent
            parser.add_argument(*flags, dest=field.name, action="append", type=_argparse_type(field, opt),
                                default=None, metavar=_metavar(field, opt), help=opt.help)
        else:
            parser.add_argument(
                *flags, dest=field.name, type=_argparse_type(field, opt), default=field.default,
                required=opt.required, metavar=_metavar(field, opt), help=opt.help,
            )


def from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of `cls` from parsed arguments (declared options present in `args`) plus
    `values` (positional arguments such as input/output)."""
    for field, _ in declared(cls):
        if field.name not in values and hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
    return cls(**values)


def parse_json_object(text: str) -> dict:
    """Command-line JSON object (e.g. --storage-options)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"not valid JSON ({e}): e.g. '{{\"client_kwargs\": {{\"endpoint_url\": \"http://minio:9000\"}}}}'"
        ) from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _check_run_id(run_id: str) -> None:
    from schemas.ids import check_run_id

    check_run_id(run_id)


DEVICES = ("auto", "cpu", "cuda")
IMAGE_SIZES = ("256", "full")

# The options several commands share, each declared once: `shared(name, **changes)` makes the field.
SHARED: dict[str, dict[str, Any]] = {
    "storage_options": dict(
        default=None, parse=parse_json_object,
        help="JSON object passed to fsspec for every location of the command (credentials, endpoint_url; "
             "a value 'env:NAME' is read from the environment variable NAME)"),
    "run_id": dict(default=None, check=_check_run_id,
                   help="recorded on every row (default: UTC time + random suffix)"),
    "device": dict(default="auto", choices=DEVICES,
                   help="where the model runs: cuda when the model actor sees a GPU (auto)"),
    "batch_size": dict(default=None, parse=int, minimum=1, help="images per model forward pass (default 32 GPU / 8 CPU); the model stage "
                       "may get larger blocks (128 rows with --align none) and runs them in passes of this size"),
    "gpus": dict(default=None, parse=int, minimum=0, help="at most this many GPU model actors (default: all GPUs)"),
    "cpu_threads": dict(default=None, parse=int, minimum=1,
                        help="torch threads in a CPU model actor (default: the node's cores)"),
    "images": dict(default="png", choices=IMAGE_FORMATS,
                   help="output image encoding: png (lossless; fpng, else Pillow zlib level 1), "
                        "jpeg (quality 95, 4:2:0 chroma) or none"),
    "image_size": dict(default="256", choices=IMAGE_SIZES,
                       help="256 (pSp's resized output) or full (the generator's size, e.g. 1024)"),
    "limit": dict(default=None, parse=int, minimum=0, metavar="N", help="process at most N new inputs"),
    "address": dict(default=None, help="job server URL, e.g. http://HEAD:8265 "
                                       "(default: $RAY_API_SERVER_ADDRESS/$RAY_ADDRESS)"),
}


def shared(name: str, **changes: Any) -> Any:
    """The dataclass field of the shared option `name` (see `SHARED`), with `changes` to its
    declaration (e.g. another help text or scope)."""
    spec = {**SHARED[name], **changes}
    default, text = spec.pop("default"), spec.pop("help")
    return option(default, text, **spec)


__all__ = [
    "ConfigError",
    "SHARED",
    "shared",
    "Option",
    "option",
    "declared",
    "check_value",
    "check_options",
    "add_arguments",
    "from_args",
    "parse_json_object",
]
