"""Credentials never travel in the clear: one redaction function, and the checks around it.

`redact(value, storage_options=None)` hides credentials in a string, an exception, or a dict/list
(e.g. storage options, a run summary), returning the same kind of value:

- URLs with a user:password part (`https://user:pw@host/...` -> `https://***:***@host/...`) and
  signed-URL parameters (`X-Amz-Signature=`, `sig=`, `token=`, ...);
- values under secret option names (`key`, `secret`, `token`, `password`, `session_token`,
  `client_secret`, `account_key`, `sas_token`, `credentials`, `*_access_key_id`, ...), in dicts at
  any depth (`client_kwargs`, `config_kwargs`) and in text (`'secret': '...'`, `secret=...`);
- known secret values wherever they appear: those in `storage_options` (and in options passed to
  `remember` in this process) and in the standard credential environment variables
  (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ACCESS_KEY_ID, AZURE_STORAGE_KEY, ...).

`env:NAME` option values are references, not secrets: they are kept, and `resolve_env_refs`
replaces them with the variable's value where the job runs. The choke points that use `redact`:
the CLI's output and errors (`redacted_output`, `redacting_excepthook`), log records
(`install_log_redaction`, also a Ray worker setup hook), the rows' `error` and `source_uri` columns
right before they are written (`redacted_rows`), the run summary, and `psp submit`
(`command_line_secrets`, `env_var_secrets`: refused, never redacted into a job).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
# Shorter values are not searched for as text (they would mask ordinary words); they are still
# hidden by option name and in URLs.
MIN_SECRET_LENGTH = 8

# An option/variable name is secret when it is `key` or ends in one of these words.
_SECRET_WORDS = (
    r"secret|token|password|passwd|credentials?|account_key|access_key|secret_key|api_key|apikey"
    r"|private_key|connection_string|access_key_id|sas|sas_token|signature"
)
_SECRET_NAME = re.compile(rf"(?:[A-Za-z0-9]+[_-])*(?:{_SECRET_WORDS})", re.IGNORECASE)
# Environment variables whose values are credentials (plus any name matching _SECRET_NAME).
CREDENTIAL_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON", "GOOGLE_API_KEY", "GCS_OAUTH_TOKEN",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET", "RAY_AUTH_TOKEN",
)
# Names that look secret but hold a file path, not a credential.
_NOT_SECRET_ENV_VARS = ("GOOGLE_APPLICATION_CREDENTIALS",)
_ENV_REF = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")

_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/@:'\"]*:[^\s/@'\"]*@")
_QUERY_SECRET = re.compile(
    r"([?&;](?:x-amz-signature|x-amz-security-token|x-amz-credential|x-goog-signature"
    r"|x-goog-credential|sig|signature|token|access_token|sas_token|api_key|apikey|key|password"
    r"|secret)=)[^&\s'\"#]+",
    re.IGNORECASE,
)
# 'secret': 'value' / "secret": "value" (dict reprs, JSON) and secret=value (kwargs, env, CLI); the
# name is checked by `_is_secret_text_name` (cheaper than spelling every name into the pattern).
_QUOTED_PAIR = re.compile(r"""(["'])([A-Za-z][\w-]*)\1(\s*[:=]\s*)(["'])((?:(?!\4)[^\\]|\\.)*)\4""")
_ASSIGNMENT = re.compile(r"""(?<![\w.])([A-Za-z][\w-]*)=(?!["'])([^\s&,;'")\]}]+)""")
_HINT = re.compile(r"secret|token|passw|credential|key|sas|sig", re.IGNORECASE)

_remembered: set[str] = set()


# ------------------------------------------------------------------------------------------------
# What is secret


def is_secret_name(name: Any) -> bool:
    """True for an option or variable name that holds a credential (`key`, `secret`, `token`,
    `password`, `session_token`, `client_secret`, `account_key`, `sas_token`, `credentials`,
    `AWS_SECRET_ACCESS_KEY`, ...)."""
    return isinstance(name, str) and (name.lower() == "key" or bool(_SECRET_NAME.fullmatch(name)))


def is_env_ref(value: Any) -> bool:
    """True for an `env:NAME` option value (a reference resolved where the job runs)."""
    return isinstance(value, str) and bool(_ENV_REF.match(value))


def _leaves(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _leaves(v)


def option_secrets(options: Any) -> set[str]:
    """The secret values in storage options: everything under a secret name, at any depth, and
    the passwords of URLs with a user:password part (`env:NAME` references are not secrets)."""
    found: set[str] = set()
    if isinstance(options, Mapping):
        for k, v in options.items():
            if is_secret_name(k):
                found.update(s for s in _leaves(v) if not is_env_ref(s))
            else:
                found |= option_secrets(v)
    elif isinstance(options, (list, tuple)):
        for v in options:
            found |= option_secrets(v)
    elif isinstance(options, str):
        for m in re.finditer(r"://([^\s/@:'\"]*):([^\s/@'\"]*)@", options):
            found.update(m.groups())
    return found


def env_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of the credential environment variables set in `environ` (default: os.environ)."""
    environ = os.environ if environ is None else environ
    return {
        v for k, v in environ.items()
        if v and (k in CREDENTIAL_ENV_VARS or is_secret_name(k)) and k not in _NOT_SECRET_ENV_VARS
        and not is_env_ref(v)
    }


def remember(storage_options: Any) -> None:
    """Treat the secret values in `storage_options` as known in this process from now on (the CLI
    calls this once the options are resolved, so every later print and log line is covered)."""
    _remembered.update(option_secrets(storage_options))


def known_secrets(storage_options: Any = None) -> list[str]:
    """Secret values to search for as text, longest first (with their URL-encoded forms)."""
    values = env_secrets() | _remembered | option_secrets(storage_options)
    out: set[str] = set()
    for v in values:
        if len(v) >= MIN_SECRET_LENGTH:
            out.update({v, quote(v, safe=""), quote_plus(v)})
    return sorted(out, key=len, reverse=True)


# ------------------------------------------------------------------------------------------------
# The redaction function


def _is_secret_text_name(name: str) -> bool:
    # The bare name `key` only in lower case: 'Key' is an object key in botocore's messages.
    return name == "key" or (name.lower() != "key" and is_secret_name(name))


def _mask_pair(m: re.Match) -> str:
    value = m.group(5)
    if not value or is_env_ref(value) or not _is_secret_text_name(m.group(2)):
        return m.group(0)
    q = m.group(4)
    return f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}{q}{MASK}{q}"


def _mask_assignment(m: re.Match) -> str:
    if is_env_ref(m.group(2)) or not _is_secret_text_name(m.group(1)):
        return m.group(0)
    return f"{m.group(1)}={MASK}"


def _redact_text(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    if "://" in text and "@" in text:
        text = _URL_USERINFO.sub(rf"\1{MASK}:{MASK}@", text)
    if not _HINT.search(text):
        return text
    if "=" in text:
        text = _QUERY_SECRET.sub(rf"\1{MASK}", text)
        text = _ASSIGNMENT.sub(_mask_assignment, text)
    if ":" in text or "=" in text:
        text = _QUOTED_PAIR.sub(_mask_pair, text)
    return text


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return _redact_text(value, secrets)
    if isinstance(value, BaseException):
        message = str(value)
        name = type(value).__name__
        return _redact_text(f"{name}: {message}" if message else name, secrets)
    if isinstance(value, Mapping):
        return {
            k: (MASK if is_secret_name(k) and v not in (None, "", False) and not is_env_ref(v)
                else _redact(v, secrets))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v, secrets) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact(v, secrets) for v in value)
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
        red = _redact_text(text, secrets)
        return value if red == text else red.encode()
    return value


def redact(value: Any, storage_options: Any = None) -> Any:
    """`value` with its credentials masked as `***`.

    str -> str; an exception -> its message ("TypeName: message"); dict -> a new dict (values under
    secret names masked, the rest redacted recursively); list/tuple -> the same kind; bytes ->
    bytes; anything else unchanged. Known secret values come from the credential environment
    variables, from `storage_options` and from what `remember` was given in this process.
    """
    return _redact(value, known_secrets(storage_options))


# ------------------------------------------------------------------------------------------------
# env:NAME references


def resolve_env_refs(options: Any, flag: str = "--storage-options", environ: Mapping[str, str] | None = None) -> Any:
    """`options` with every `env:NAME` string replaced by the value of the environment variable
    NAME here (where the job runs), at any depth. A variable that is not set raises
    `pipelines.config.ConfigError` naming it and the option."""
    from pipelines.config import ConfigError

    environ = os.environ if environ is None else environ

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, Mapping):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        m = _ENV_REF.match(value) if isinstance(value, str) else None
        if m is None:
            return value
        name = m.group(1)
        if name not in environ:
            import socket

            raise ConfigError(
                f"{flag}: {where or 'value'} is env:{name}, but the environment variable {name} is "
                f"not set on {socket.gethostname()} (where the job runs): set it there (on a cluster "
                "from a Kubernetes Secret or the node's environment, see README 'Credentials'), or "
                "drop the option to use the cluster's own credentials (instance or pod role)"
            )
        return environ[name]

    return walk(options, "")


# ------------------------------------------------------------------------------------------------
# psp submit: what must never be sent


HOW_TO_PASS_CREDENTIALS = (
    "A job's command line and runtime_env are readable by anyone who can list jobs on the "
    "cluster, and stay in its history. Give the cluster its own credentials instead: an instance "
    "or pod role (IAM role / IRSA, GKE workload identity, Azure managed identity), or a Kubernetes "
    "Secret mounted as environment variables (infra/kuberay/*.yaml mount the Secret psp-s3), and "
    "name the variables the job reads where it runs: --storage-options "
    "'{\"key\": \"env:AWS_ACCESS_KEY_ID\", \"secret\": \"env:AWS_SECRET_ACCESS_KEY\"}'. "
    "Nothing was submitted"
)


def command_line_secrets(args: Iterable[str]) -> list[str]:
    """What in a psp command line carries a credential, described without the value: secret
    `--storage-options` keys with literal values, URLs with user:password, signed-URL parameters,
    known secret values. Empty when the command is safe to send."""
    import json

    args = [str(a) for a in args]
    options_at: dict[int, str] = {}
    for i, a in enumerate(args):
        if a == "--storage-options" and i + 1 < len(args):
            options_at[i + 1] = args[i + 1]
        elif a.startswith("--storage-options="):
            options_at[i] = a.split("=", 1)[1]
    problems: list[str] = []
    secrets = known_secrets()
    for i, a in enumerate(args):
        if i in options_at:
            try:
                names = _secret_paths(json.loads(options_at[i]))
            except ValueError:
                names = []
            if names:
                problems.append(f"--storage-options sets {', '.join(names)} to a value")
                continue
        if _URL_USERINFO.search(a):
            problems.append(f"argument {i + 1} is a URL with a user:password part")
        elif _redact_text(a, secrets) != a:
            problems.append(f"argument {i + 1} holds a credential")
    return problems


def _secret_paths(options: Any, where: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(options, Mapping):
        for k, v in options.items():
            path = f"{where}.{k}" if where else str(k)
            if is_secret_name(k):
                if v not in (None, "", False, True) and not is_env_ref(v):
                    out.append(repr(path))
            else:
                out += _secret_paths(v, path)
    elif isinstance(options, list):
        for i, v in enumerate(options):
            out += _secret_paths(v, f"{where}[{i}]")
    return out


def env_var_secrets(env_vars: Mapping[str, Any] | None) -> list[str]:
    """Names of job environment variables (runtime_env env_vars) that carry a credential."""
    secrets = known_secrets()
    return [
        k for k, v in (env_vars or {}).items()
        if (is_secret_name(k) or k in CREDENTIAL_ENV_VARS or _redact_text(str(v), secrets) != str(v))
        and not is_env_ref(v)
    ]


# ------------------------------------------------------------------------------------------------
# Choke points: rows before they are written, log records, what the CLI prints


REDACTED_COLUMNS = ("error", "source_uri")


def redact_table(table, storage_options: Any = None):
    """A pyarrow Table with credentials masked in its `error` and `source_uri` columns (the free
    text a row carries). Columns without anything to mask are kept as they are (zero copy)."""
    import pyarrow as pa

    secrets = known_secrets(storage_options)
    for name in REDACTED_COLUMNS:
        if name not in table.column_names:
            continue
        col = table.column(name)
        values = col.to_pylist()
        red = [v if not isinstance(v, str) else _redact_text(v, secrets) for v in values]
        if red != values:
            table = table.set_column(
                table.column_names.index(name), table.schema.field(name), pa.array(red, type=col.type)
            )
    return table


def redacted_rows(ds, storage_options: Any = None):
    """`ds` (a Ray Dataset of output rows) with `redact_table` applied to every block just before it
    is written. A task map: Ray fuses it into the write operator, so it costs no extra pass."""
    return ds.map_batches(
        redact_table,
        fn_kwargs={"storage_options": storage_options},
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        num_cpus=0.25,  # the write tasks' (pipelines.table.WRITE_CPUS): fused with them, I/O bound
    )


_factory_installed = False


def _redact_record(record: logging.LogRecord) -> None:
    secrets = known_secrets()
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken format string is the handler's to report
        return
    red = _redact_text(message, secrets)
    if red != message:
        record.msg, record.args = red, None
    if record.exc_info and not record.exc_text:
        text = logging.Formatter().formatException(record.exc_info)
        record.exc_text = _redact_text(text, secrets)


def install_log_redaction() -> None:
    """Redact every log record created in this process from now on (message and traceback), for
    the tool's loggers and the libraries' alike. Idempotent. Also a Ray `worker_process_setup_hook`
    ("pipelines.secrets.install_log_redaction"), so worker logs are covered."""
    global _factory_installed
    if _factory_installed:
        return
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        _redact_record(record)
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


WORKER_SETUP_HOOK = "pipelines.secrets.install_log_redaction"


class RedactingStream(io.TextIOBase):
    """A text stream that writes complete lines (ending in \\n or \\r) to `target`, redacted;
    a partial line waits for its end, so a secret split across writes is still found."""

    def __init__(self, target: Any):
        self.target = target
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        cut = max(self._buffer.rfind("\n"), self._buffer.rfind("\r"))
        if cut >= 0:
            done, self._buffer = self._buffer[: cut + 1], self._buffer[cut + 1 :]
            self.target.write(redact(done))
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def drain(self) -> None:
        """Write what is left of a last, unterminated line."""
        if self._buffer:
            self.target.write(redact(self._buffer))
            self._buffer = ""
        self.target.flush()

    def isatty(self) -> bool:
        try:
            return bool(self.target.isatty())
        except (AttributeError, ValueError):  # no such method, or the target was closed
            return False

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.target, "closed", False))

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """Within the block, everything written to sys.stdout / sys.stderr is redacted."""
    out, err = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        out.drain()
        err.drain()


def redacting_excepthook(kind, value, tb) -> None:
    """sys.excepthook that prints an uncaught exception's traceback redacted."""
    import traceback

    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))


__all__ = [
    "HOW_TO_PASS_CREDENTIALS",
    "MASK",
    "WORKER_SETUP_HOOK",
    "RedactingStream",
    "command_line_secrets",
    "env_secrets",
    "env_var_secrets",
    "install_log_redaction",
    "is_env_ref",
    "is_secret_name",
    "known_secrets",
    "option_secrets",
    "redact",
    "redact_table",
    "redacted_output",
    "redacted_rows",
    "redacting_excepthook",
    "remember",
    "resolve_env_refs",
]
