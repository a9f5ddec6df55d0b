"""`import fastint` refuses a missing or stale extension and says how to build it."""
import pytest

from fastint import _ext


def test_loaded_extension_is_current():
    _ext.load()  # the build under test matches csrc/ and torch


def test_stale_build_is_refused(monkeypatch):
    monkeypatch.setattr(_ext, "_source_hash", lambda csrc: "0" * 16)
    with pytest.raises(ImportError, match="stale.*make build"):
        _ext.load()


def test_missing_build_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(_ext, "_PKG", str(tmp_path))
    with pytest.raises(ImportError, match="not built.*make build"):
        _ext.load()


def test_torch_mismatch_is_refused(monkeypatch):
    monkeypatch.setattr(_ext.torch, "__version__", "0.0.0")
    with pytest.raises(ImportError, match="built against torch"):
        _ext.load()
