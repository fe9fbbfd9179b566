"""One chunked sha256 for models, corpora and artifacts (encoder.hashing)."""

from __future__ import annotations

import hashlib

from encoder import hashing


def test_named_files_hash_names_then_bytes_across_chunks(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (hashing.CHUNK // 256 * 2 + 7))  # more than two chunks
    small = tmp_path / "small.txt"
    small.write_text("x")
    want = hashlib.sha256(b"a" + big.read_bytes() + b"b" + small.read_bytes()).hexdigest()
    assert hashing.sha256_named_files([("a", big), ("b", small)]) == want
    assert hashing.sha256_named_files([("b", small), ("a", big)]) != want  # order is part of it
    assert hashing.sha256_file(big) == hashlib.sha256(big.read_bytes()).hexdigest()
