"""Credentials never travel in the clear: the redaction function, `env:NAME` options, and what
`psp submit` refuses to send. (End to end through Ray and S3: tests/test_secrets_e2e.py.)"""
from __future__ import annotations

import json
import logging

from jobs.cli import main as psp
from pipelines.secrets import (
    command_line_secrets,
    env_var_secrets,
    install_log_redaction,
    redact,
    redact_table,
    resolve_env_refs,
)

SECRET = "psp-unit-secret-7f3a9c"  # distinctive: found nowhere unless it leaked


def test_urls_with_user_and_password_and_signed_urls_are_masked():
    text = redact(f"cannot read https://alice:{SECRET}@host:8443/f.jpg?X-Amz-Signature=abc123&v=1: boom")
    assert SECRET not in text and "alice" not in text and "abc123" not in text
    # What the reader needs stays: the host, the object, the failure.
    assert text == "cannot read https://***:***@host:8443/f.jpg?X-Amz-Signature=***&v=1: boom"
    plain = "s3://bucket/photos/a@2x.jpg http://minio:9000/b"
    assert redact(plain) == plain


def test_storage_option_secrets_are_masked_at_any_depth_and_references_kept():
    options = {
        "key": "AKIAEXAMPLEKEY", "secret": SECRET, "token": "env:AWS_SESSION_TOKEN", "anon": False,
        "client_kwargs": {"endpoint_url": "http://minio:9000", "aws_session_token": "tok-123456"},
        "config_kwargs": {"signature_version": "s3v4"},
        "credentials": {"type": "service_account", "private_key": "-----BEGIN..."},
        "account_key": "azure-key", "sas_token": "sv=2020&sig=x", "password": "p", "client_secret": "c",
    }
    red = redact(options)
    assert SECRET not in json.dumps(red)
    assert red == {
        "key": "***", "secret": "***", "token": "env:AWS_SESSION_TOKEN", "anon": False,
        "client_kwargs": {"endpoint_url": "http://minio:9000", "aws_session_token": "***"},
        "config_kwargs": {"signature_version": "s3v4"},
        "credentials": "***", "account_key": "***", "sas_token": "***", "password": "***",
        "client_secret": "***",
    }
    assert options["secret"] == SECRET  # a copy: the caller's options still work


def test_known_secret_values_are_masked_in_text_lists_and_exceptions(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret-" + SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-" + SECRET)
    options = {"secret": "option-" + SECRET}
    message = f"failed with envsecret-{SECRET} and session-{SECRET} and option-{SECRET}"
    assert SECRET not in redact(message, options)
    assert SECRET in redact(message)  # the option value is only known when given (or remembered)
    err = redact(PermissionError(f"denied for option-{SECRET}"), options)
    assert err == "PermissionError: denied for ***"
    assert redact([message, (message,)], options) == [redact(message, options), (redact(message, options),)]
    # In text: dict reprs, JSON, key=value, environment assignments.
    text = ("got {'secret': 'abc', 'Key': 'photos/a.jpg'} "
            '{"key": "AKIA1", "token": "env:T"} secret=abc AWS_SECRET_ACCESS_KEY=xyz --password=pw')
    assert redact(text) == ("got {'secret': '***', 'Key': 'photos/a.jpg'} "
                            '{"key": "***", "token": "env:T"} secret=*** AWS_SECRET_ACCESS_KEY=*** --password=***')
    # Ordinary error messages are left readable.
    s3 = "An error occurred (NoSuchKey) when calling the GetObject operation: The specified key does not exist."
    assert redact(s3) == s3


def test_rows_error_and_source_uri_are_masked_before_writing():
    import pyarrow as pa

    table = pa.table({
        "source_uri": [f"https://u:{SECRET}@h/x.jpg", "s3://b/ok.jpg"],
        "status": ["read_error", "ok"],
        "error": [f"cannot read https://u:{SECRET}@h/x.jpg: 401", None],
    })
    out = redact_table(table)
    assert SECRET not in str(out.to_pylist()) and out.schema == table.schema
    assert out["error"].to_pylist() == ["cannot read https://***:***@h/x.jpg: 401", None]
    clean = table.slice(1)
    assert redact_table(clean) is clean  # nothing to mask: no copy


def test_log_records_are_redacted(caplog):
    install_log_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("psp_core.psp").info("checkpoint %s loaded", f"https://u:{SECRET}@h/c.pt")
        try:
            raise ValueError(f"boom secret={SECRET}")
        except ValueError:
            logging.getLogger("pipelines.dataflow").exception("failed")
    assert SECRET not in caplog.text and "https://***:***@h/c.pt" in caplog.text and "boom" in caplog.text


def test_env_references_resolve_where_the_command_runs(monkeypatch):
    monkeypatch.setenv("PSP_TEST_SECRET", SECRET)
    options = {"secret": "env:PSP_TEST_SECRET", "client_kwargs": {"endpoint_url": "http://minio:9000"}}
    assert resolve_env_refs(options) == {"secret": SECRET, "client_kwargs": {"endpoint_url": "http://minio:9000"}}


def test_a_missing_env_reference_fails_fast_naming_the_variable(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("PSP_NO_SUCH_VARIABLE", raising=False)
    assert psp(["inspect", str(tmp_path), "--storage-options", '{"secret": "env:PSP_NO_SUCH_VARIABLE"}']) == 2
    err = capsys.readouterr().err
    assert "PSP_NO_SUCH_VARIABLE" in err and "is not set" in err and "secret" in err


def test_the_cli_prints_nothing_secret(capsys, tmp_path, monkeypatch):
    """A message that would have carried the secret (here: an output folder named after it, which
    `psp inspect` echoes) comes out masked, because the CLI learnt the value from the options."""
    monkeypatch.setenv("PSP_TEST_SECRET", SECRET)
    options = '{"secret": "env:PSP_TEST_SECRET"}'
    assert psp(["inspect", str(tmp_path / SECRET), "--storage-options", options]) == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err and "***' (no _delta_log)" in captured.err


def test_submit_checks_find_credentials_on_a_command_line():
    base = ["invert", "s3://in/", "s3://out/", "--checkpoint", "s3://m/psp.pt"]
    assert command_line_secrets(base) == []
    assert command_line_secrets(base + ["--storage-options", json.dumps(
        {"key": "env:AWS_ACCESS_KEY_ID", "secret": "env:AWS_SECRET_ACCESS_KEY",
         "client_kwargs": {"endpoint_url": "https://minio.local:9000"}})]) == []
    found = command_line_secrets(base + [f'--storage-options={{"key": "AKIA1", "secret": "{SECRET}"}}'])
    assert found == ["--storage-options sets 'key', 'secret' to a value"] and SECRET not in str(found)
    nested = {"client_kwargs": {"aws_secret_access_key": SECRET}}
    assert "client_kwargs.aws_secret_access_key" in command_line_secrets(
        base + ["--storage-options", json.dumps(nested)])[0]
    assert command_line_secrets(["invert", f"https://u:{SECRET}@h/in/", "s3://out/"]) == [
        "argument 2 is a URL with a user:password part"]
    assert env_var_secrets({"OMP_NUM_THREADS": "1", "AWS_SECRET_ACCESS_KEY": SECRET,
                            "TOKEN_REF": "env:X"}) == ["AWS_SECRET_ACCESS_KEY"]


def test_submit_refuses_credentials_before_contacting_the_cluster(capsys):
    """No server at this address: a refusal that mentions it proves nothing was sent."""
    argv = ["submit", "--address", "http://127.0.0.1:9", "--", "invert", "s3://in/", "s3://out/",
            "--checkpoint", "s3://m/psp.pt", "--storage-options", json.dumps({"secret": SECRET})]
    assert psp(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to submit" in err and "env:AWS_SECRET_ACCESS_KEY" in err and "Kubernetes Secret" in err
    assert SECRET not in err and "cannot reach" not in err
    assert psp(["submit", "--address", "http://127.0.0.1:9", "--env", f"AWS_SECRET_ACCESS_KEY={SECRET}",
                "--", "invert", "s3://in/", "s3://out/", "--checkpoint", "s3://m/psp.pt"]) == 2
    err = capsys.readouterr().err
    assert "AWS_SECRET_ACCESS_KEY" in err and SECRET not in err and "cannot reach" not in err
