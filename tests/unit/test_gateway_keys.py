"""The gateway's key store over a folder laid out as the kubelet lays out a Secret volume:
keys by client name, a swapped Secret picked up, a broken re-read keeping the old keys,
and no key ever in the log."""

from __future__ import annotations

import logging
import os

import pytest

from tests.support.podrunner import write_config_map
from tritonop.gateway.auth import MAX_KEY_BYTES, KeyStore, KeyStoreError, presented_key


def test_each_file_is_a_client_and_the_kubelets_dot_entries_are_not(tmp_path):
    write_config_map(tmp_path, {"alice": "sk-alice\n", "bob": "sk-bob"})
    assert sorted(os.listdir(tmp_path))[0].startswith("..")  # ..2026_..., ..data
    keys = KeyStore(tmp_path)
    assert sorted(keys.clients) == ["alice", "bob"]
    assert keys.lookup(b"sk-alice") == "alice"  # the file's trailing newline is not the key
    assert keys.lookup(b"sk-bob") == "bob"
    for almost in (b"sk-alic", b"sk-alice!", b"sk-alicf", b"", None, b"x" * (MAX_KEY_BYTES + 1)):
        assert keys.lookup(almost) is None


def test_the_command_lines_key_is_the_client_default_beside_the_folders(tmp_path):
    write_config_map(tmp_path, {"alice": "sk-alice"})
    keys = KeyStore(tmp_path, key="sk-local")
    assert keys.lookup(b"sk-local") == "default"
    assert keys.lookup(b"sk-alice") == "alice"
    assert KeyStore(key="sk-local").clients == ["default"]


def test_an_empty_key_is_ignored_with_a_warning_naming_the_client(tmp_path, caplog):
    write_config_map(tmp_path, {"alice": "sk-alice", "blank": "\n"})
    with caplog.at_level(logging.WARNING, logger="tritonop.gateway.auth"):
        keys = KeyStore(tmp_path)
    assert keys.clients == ["alice"]
    assert "'blank' is empty" in caplog.text


def test_a_swapped_secret_replaces_the_keys_and_only_then_is_reread(tmp_path, caplog):
    write_config_map(tmp_path, {"alice": "sk-old", "bob": "sk-bob"})
    keys = KeyStore(tmp_path)
    assert not keys.refresh()  # nothing changed: nothing read
    write_config_map(tmp_path, {"alice": "sk-new", "carol": "sk-carol"})
    with caplog.at_level(logging.INFO, logger="tritonop.gateway.auth"):
        assert keys.refresh()
    assert keys.lookup(b"sk-old") is None and keys.lookup(b"sk-bob") is None
    assert keys.lookup(b"sk-new") == "alice" and keys.lookup(b"sk-carol") == "carol"
    assert "sk-" not in caplog.text


def test_a_failed_reread_keeps_the_previous_keys_and_says_why(tmp_path, caplog):
    folder = tmp_path / "keys"
    write_config_map(folder, {"alice": "sk-alice"})
    keys = KeyStore(folder)
    folder.rename(tmp_path / "gone")
    with caplog.at_level(logging.WARNING, logger="tritonop.gateway.auth"):
        assert not keys.refresh()
    assert keys.lookup(b"sk-alice") == "alice"
    assert "could not re-read the API keys" in caplog.text
    assert "No such file" in caplog.text and "sk-alice" not in caplog.text
    (tmp_path / "gone").rename(folder)
    write_config_map(folder, {"alice": "sk-next"})
    assert keys.refresh() and keys.lookup(b"sk-next") == "alice"


def test_a_folder_that_cannot_be_read_at_start_is_an_error_naming_it(tmp_path):
    with pytest.raises(KeyStoreError, match=str(tmp_path / "missing")):
        KeyStore(tmp_path / "missing")


@pytest.mark.parametrize(("headers", "key", "other_scheme"), [
    ([(b"authorization", b"Bearer sk-1")], b"sk-1", False),
    ([(b"authorization", b"bearer   sk-1 ")], b"sk-1", False),
    ([(b"x-api-key", b"sk-2")], b"sk-2", False),
    ([(b"x-api-key", b"sk-2"), (b"authorization", b"Bearer sk-1")], b"sk-1", False),
    ([(b"authorization", b"Basic c2stMQ==")], None, True),
    ([(b"authorization", b"Bearer")], b"", False),
    ([], None, False),
])
def test_the_presented_key_is_the_bearer_token_or_else_x_api_key(headers, key, other_scheme):
    assert presented_key(headers) == (key, other_scheme)
