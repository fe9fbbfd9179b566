"""Corpus readers agree across formats; chunking covers every token with dense ids."""

from __future__ import annotations

import json

import pytest

from api.errors import InputError
from encoder.model_loading import load_tokenizer
from indexer.chunking import ChunkConfig, Chunker
from indexer.corpus import read_corpus


@pytest.fixture(scope="module")
def docs(fact_corpus_files):
    return list(read_corpus(fact_corpus_files[0]))


@pytest.fixture(scope="module")
def tokenizer(trained_checkpoint):
    return load_tokenizer(trained_checkpoint.checkpoint_dir)


def test_jsonl_fields(docs, fact_corpus_files):
    lines = [json.loads(x) for x in fact_corpus_files[0].read_text().splitlines()]
    assert [(d.id, d.text, d.source) for d in docs] == [
        (x["id"], x["text"], x["source"]) for x in lines
    ]


def test_parquet_and_datasets_dir_read_the_same(docs, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "id": [d.id for d in docs],
            "text": [d.text for d in docs],
            "source": [d.source for d in docs],
        }
    )
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "hf"))
    assert list(read_corpus(tmp_path / "c.parquet")) == docs
    assert list(read_corpus(tmp_path / "hf")) == docs


def test_text_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second ü", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\xff")
    got = [(d.id, d.text) for d in read_corpus(tmp_path)]
    assert got == [("a.txt", "first"), ("b/two.txt", "second ü")]
    (tmp_path / "c.txt").write_bytes(b"bad \xff")
    with pytest.raises(InputError) as info:
        list(read_corpus(tmp_path))
    assert info.value.code == "invalid_encoding" and "c.txt" in info.value.message


@pytest.mark.parametrize(("seq_len", "stride"), [(16, 16), (16, 5), (128, 128)])
def test_unpacked_windows_cover_each_document(docs, tokenizer, seq_len, stride):
    chunker = Chunker(tokenizer, ChunkConfig(seq_len, stride))
    chunks = list(chunker.chunks(docs))
    assert [c.record.id for c in chunks] == list(range(len(chunks)))
    by_doc: dict[str, list] = {}
    for c in chunks:
        assert 2 <= len(c.input_ids) <= seq_len
        assert c.record.token_end - c.record.token_start == len(c.input_ids)
        by_doc.setdefault(c.record.document_id, []).append(c)
    assert list(by_doc) == [d.id for d in docs]
    for d in docs:
        full = tokenizer(d.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        covered = set()
        for c in by_doc[d.id]:
            assert full[c.record.token_start : c.record.token_end] == c.input_ids
            assert c.record.text == d.text[c.record.char_start : c.record.char_end]
            covered.update(range(c.record.token_start, c.record.token_end))
        assert covered == set(range(len(full)))


def test_packed_windows_tile_the_stream(docs, tokenizer):
    chunks = list(Chunker(tokenizer, ChunkConfig(32, 32, pack=True)).chunks(docs))
    stream = [
        t
        for d in docs
        for t in tokenizer(d.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]
    assert [t for c in chunks for t in c.input_ids] == stream
    assert all(len(c.input_ids) == 32 for c in chunks[:-1])
