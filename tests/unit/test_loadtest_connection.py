"""How the load generator reaches a controller (loadtest/__main__.py, loadtest/runner.py Connection,
loadtest/openai_api.py): protocol, bearer token and TLS options for both protocols, checked before any run,
and never written into a report."""

import pytest

from loadtest.__main__ import _redacted, connection, parse_args
from loadtest.openai_api import base_url
from loadtest.runner import Connection
from tests.tls import make_pki

RUN = ["--requests", "1"]


def test_the_token_never_reaches_the_recorded_command():
    argv = ["--auth-token", "s3cret", "--auth-token=other", "--auth-token-file", "f", *RUN]
    assert _redacted(argv) == ["--auth-token", "***", "--auth-token=***", "--auth-token-file", "f", *RUN]


def test_token_lists_and_files_send_their_first_token(tmp_path):
    assert connection(parse_args(["--target", "h:1", "--auth-token", "new,old", *RUN])).auth_token == "new"
    tokens = tmp_path / "tokens"
    tokens.write_text("from-file\nolder\n")
    assert connection(parse_args(["--target", "h:1", "--auth-token-file", str(tokens), *RUN])).auth_token == "from-file"
    assert connection(parse_args(["--target", "h:1", *RUN])).auth_token is None


def test_tls_settings_are_checked_before_anything_runs(tmp_path, capsys):
    pki = make_pki(tmp_path)
    ok = parse_args(["--target", "h:1", "--protocol", "http", "--tls-ca-file", str(pki.ca), *RUN])
    assert connection(ok).secure and connection(ok).tls_config().root_certificates == pki.ca.read_bytes()
    for bad in (
        ["--tls-cert-file", str(pki.client_cert)],  # a client certificate without its key (the SDK's rule)
        ["--tls-ca-file", str(tmp_path / "missing.pem")],
        ["--auth-token-file", str(tmp_path / "missing")],
    ):
        with pytest.raises(SystemExit):
            parse_args(["--target", "h:1", *bad, *RUN])
        assert "authentication or TLS settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--local-stack", "--auth-token", "t", *RUN])


def test_the_http_target_is_a_url_or_host_port():
    assert base_url(Connection("h:8000", "http")) == "http://h:8000"
    assert base_url(Connection("h:8000", "http", tls=True)) == "https://h:8000"
    assert base_url(Connection("https://h:8000/", "http")) == "https://h:8000"
    assert Connection("https://h:8000", "http").secure and not Connection("h:8000", "http").secure
    with pytest.raises(ValueError, match="protocol"):
        Connection("h:1", "websocket")
