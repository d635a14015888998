"""Where ``tritonop serve`` and ``tritonop gateway`` listen and what they tell the user:
loopback unless asked, a warning on stderr beyond it without a key, and printed calls that
carry the key's variable, never the key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.support.triton import API
from tritonop.cli import main
from tritonop.resources import parse_resource
from tritonop.runtime.local import ServerError, TritonServer
from tritonop.runtime.serve import control_api_args, usage, warn_if_exposed

SEARCH = parse_resource({"apiVersion": API, "kind": "EmbeddingSearch",
                         "metadata": {"name": "news"}, "spec": {"corpus": {"source": "c.txt"}}})
CHAT = parse_resource({"apiVersion": API, "kind": "LLMService", "metadata": {"name": "chat"},
                       "spec": {}})


def flags(server: TritonServer) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in server.command()[1:]
                if arg.startswith("--") and "=" in arg)


def test_triton_listens_on_the_loopback_unless_given_an_address(tmp_path):
    server = TritonServer(tmp_path / "repository", tmp_path)
    found = flags(server)
    assert found["http-address"] == found["grpc-address"] == found["metrics-address"] \
        == "127.0.0.1"
    assert server.http_url == f"127.0.0.1:{server.ports.http}"
    other = TritonServer(tmp_path / "repository", tmp_path, address="0.0.0.0")
    assert flags(other)["grpc-address"] == "0.0.0.0"
    assert other.grpc_url == f"localhost:{other.ports.grpc}"


@pytest.mark.parametrize(("host", "gateway", "keyed", "warnings"), [
    ("127.0.0.1", True, False, 0),
    ("localhost", True, False, 0),
    ("0.0.0.0", True, True, 1),  # Triton's ports take no key, whatever the gateway's
    ("0.0.0.0", True, False, 2),
    ("192.0.2.7", False, False, 1),
])
def test_listening_beyond_the_loopback_warns_on_stderr(host, gateway, keyed, warnings, caplog):
    with caplog.at_level(logging.WARNING, logger="tritonop.runtime.serve"):
        warn_if_exposed(host, gateway, keyed)
    assert len(caplog.records) == warnings
    assert all(host in record.getMessage() for record in caplog.records)


def test_printed_calls_send_the_keys_variable_never_a_key():
    printed = usage([SEARCH, CHAT], TritonServer(Path("r"), Path("w")).ports, 8080,
                    keyed=True)
    calls = [line for line in printed.replace("\\\n", " ").splitlines()
             if "localhost:8080/v1" in line and line.strip().startswith(("curl", "python"))]
    assert len(calls) == 4
    for call in calls:
        assert ('"Authorization: Bearer $TRITONOP_API_KEY"' in call
                or "api_key=os.environ['TRITONOP_API_KEY']" in call), call
    open_calls = usage([SEARCH], TritonServer(Path("r"), Path("w")).ports, 8080)
    assert "Authorization" not in open_calls and "TRITONOP_API_KEY" not in open_calls


def test_the_gateway_refuses_to_start_on_an_unreadable_keys_folder(tmp_path, capsys):
    config = tmp_path / "gateway.json"
    config.write_text('{"models": []}')
    code = main(["gateway", "--config", str(config), "--api-keys", str(tmp_path / "none"),
                 "--port", "0"])
    assert code == 2
    assert f"cannot read the API keys in {tmp_path / 'none'}" in capsys.readouterr().err


def test_tls_needs_both_files(tmp_path, capsys):
    config = tmp_path / "gateway.json"
    config.write_text('{"models": []}')
    assert main(["gateway", "--config", str(config), "--tls-cert", "c.pem"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def test_triton_control_apis_close_when_serve_listens_beyond_the_loopback(monkeypatch):
    monkeypatch.delenv("TRITONOP_TRITON_ADMIN_KEY", raising=False)
    assert control_api_args("127.0.0.1") == control_api_args("localhost") == []
    first, second = control_api_args("0.0.0.0"), control_api_args("0.0.0.0")
    assert [arg.split("=", 1)[0] for arg in first] == ["--http-restricted-api",
                                                      "--grpc-restricted-protocol"]
    assert "model-repository" in first[0] and "statistics" in first[1]
    assert first != second  # without a key of the user's, an unknown random one closes them
    monkeypatch.setenv("TRITONOP_TRITON_ADMIN_KEY", "s3cret-Key_1")
    assert all(arg.endswith(":triton-admin-key=s3cret-Key_1")
               for arg in control_api_args("192.0.2.7"))
    monkeypatch.setenv("TRITONOP_TRITON_ADMIN_KEY", "a:b")
    with pytest.raises(ServerError, match="TRITONOP_TRITON_ADMIN_KEY: a key must not contain"):
        control_api_args("0.0.0.0")
