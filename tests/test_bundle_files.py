"""Checksums of bundle files are remembered across processes, per version of a file: a second process
hashes nothing, any write to a file (which changes its ctime) is hashed again, and `check` hashes all."""

from __future__ import annotations

import os
import shutil

import pytest

from tstitch_trt.bundle import files
from tstitch_trt.bundle.manifest import read_manifest, verify_bundle
from tstitch_trt.demo import resolve_bundle
from tstitch_trt.errors import BundleError


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    monkeypatch.setenv(files.MEMO_ENV, str(tmp_path / "memo"))
    out = tmp_path / "demo"
    shutil.copytree(resolve_bundle("demo"), out)
    return out


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files hashed; the process memo cleared, as in a new process."""
    names: list[str] = []
    real = files.sha256_file

    def counting(path):
        names.append(str(path))
        return real(path)

    monkeypatch.setattr(files, "sha256_file", counting)
    monkeypatch.setattr(files, "_verified", {})
    return names


def test_a_second_process_hashes_nothing(bundle, hashed, monkeypatch):
    manifest = read_manifest(bundle)
    verify_bundle(bundle, manifest)
    assert len(hashed) == len(manifest.files()) > 0
    monkeypatch.setattr(files, "_verified", {})  # a new process
    hashed.clear()
    verify_bundle(bundle, manifest)
    assert hashed == []
    verify_bundle(bundle, manifest, fresh=True)  # `check`: everything, whatever the memo says
    assert len(hashed) == len(manifest.files())


def test_a_write_after_verification_is_seen(bundle, hashed, monkeypatch):
    manifest = read_manifest(bundle)
    verify_bundle(bundle, manifest)
    rel = manifest.files()[0]
    path = bundle / rel
    data = bytearray(path.read_bytes())
    st = path.stat()
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the ctime tells
    monkeypatch.setattr(files, "_verified", {})
    with pytest.raises(BundleError, match=f"checksum mismatch for bundle file {rel}"):
        verify_bundle(bundle, manifest)


def test_a_mismatch_is_never_remembered_and_off_means_nowhere(bundle, hashed, monkeypatch, tmp_path):
    manifest = read_manifest(bundle)
    rel = manifest.files()[-1]  # the last one verified: every other file is remembered first
    (bundle / rel).write_bytes(b"tampered")
    for _ in range(2):
        with pytest.raises(BundleError, match="checksum mismatch"):
            verify_bundle(bundle, manifest)
    memo = tmp_path / "memo"
    assert len(list(memo.iterdir())) == len(set(manifest.files())) - 1  # the good files only
    monkeypatch.setenv(files.MEMO_ENV, "off")
    shutil.rmtree(memo)
    (bundle / rel).unlink()
    shutil.copy(resolve_bundle("demo") / rel, bundle / rel)
    monkeypatch.setattr(files, "_verified", {})
    verify_bundle(bundle, manifest)
    assert not memo.exists()


def test_an_unwritable_memo_only_means_hashing_again(bundle, hashed, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv(files.MEMO_ENV, str(blocker / "memo"))
    manifest = read_manifest(bundle)
    verify_bundle(bundle, manifest)
    monkeypatch.setattr(files, "_verified", {})
    hashed.clear()
    verify_bundle(bundle, manifest)
    assert len(hashed) == len(manifest.files())
