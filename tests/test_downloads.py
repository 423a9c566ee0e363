"""download_file: atomic, checked and cached; offline detection; the errors that say what to do."""

from __future__ import annotations

import hashlib
import pickle
import urllib.error

import pytest

from lightning_quant.downloads import AssetUnavailableError, ChecksumMismatchError, download_file, is_offline
from tests.helpers.local_server import serve_files

PAYLOAD = bytes(range(256)) * 300  # 75 KiB: more than one read chunk
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_then_cache_hit(tmp_path):
    dest = tmp_path / "cache" / "w.th"
    with serve_files({"/w.th": PAYLOAD}) as server:
        assert download_file(server.url("/w.th"), dest, SHA, progress=False) == dest
        assert download_file(server.url("/w.th"), dest, SHA, progress=False) == dest
        assert server.requests["/w.th"] == 1  # the second call found the cached file
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["w.th"]  # no temporary file left


def test_checksum_mismatch_leaves_nothing(tmp_path):
    dest = tmp_path / "cache" / "w.th"
    wrong = "0" * 64
    with serve_files({"/w.th": PAYLOAD}) as server:
        url = server.url("/w.th")
        with pytest.raises(ChecksumMismatchError, match=f"{url}: expected SHA-256 {wrong}, got {SHA}") as info:
            download_file(url, dest, wrong, progress=False)
    assert (info.value.url, info.value.expected, info.value.actual) == (url, wrong, SHA)
    assert list(dest.parent.iterdir()) == []


def test_http_error_leaves_nothing(tmp_path):
    dest = tmp_path / "cache" / "w.th"
    with serve_files({}) as server, pytest.raises(urllib.error.HTTPError, match="404"):
        download_file(server.url("/missing.th"), dest, SHA, progress=False)
    assert list(dest.parent.iterdir()) == []


def test_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    assert download_file(src.as_uri(), tmp_path / "out" / "w.th", SHA, progress=False).read_bytes() == PAYLOAD


def test_is_offline_uses_the_urls_port(monkeypatch):
    monkeypatch.delenv("LIGHTNING_QUANT_OFFLINE", raising=False)
    with serve_files({}) as server:
        assert not is_offline(server.url("/x"))
    assert is_offline(server.url("/x"), timeout=1.0)  # stopped: the port refuses
    assert not is_offline("file:///nonexistent")
    monkeypatch.setenv("LIGHTNING_QUANT_OFFLINE", "1")
    assert is_offline("file:///nonexistent")


def test_errors_pickle_with_their_fields():
    err = AssetUnavailableError("gone.", arguments={"root": "/r", "download": True}, also="set X=1")
    assert str(err) == "gone. Pass root='/r' or download=True, or set X=1."
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.arguments, back.also) == (str(err), err.arguments, "set X=1")
    assert isinstance(back, FileNotFoundError)
    mismatch = pickle.loads(pickle.dumps(ChecksumMismatchError("u", "a", "b")))
    assert (mismatch.url, mismatch.expected, mismatch.actual) == ("u", "a", "b")
