"""Tokenize documents and cut them into training sequences (``seq_len``, ``stride``).

Unpacked (default): each document (plus EOS, as the trainer saw it) is cut on its own;
the last window of a document may be shorter. Packed: documents are concatenated into one
token stream (EOS between them) and cut into windows that may span documents; a packed
sequence's metadata names the document it starts in and its text joins the parts.
Windows start every ``stride`` tokens (``stride == seq_len``: no overlap); a final window
is added so that every token is covered (a lone last token gets one token of context).
A document of a single token has no next-token target and is dropped.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from api.errors import ConfigError
from indexer.corpus import Document
from indexer.metadata import ExampleRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkConfig:
    """How documents become training sequences.

    Args:
        seq_len: tokens per sequence (at most the model's context length).
        stride: tokens between window starts (1 <= stride <= seq_len).
        pack: concatenate documents before cutting.
        append_eos: end every document with the tokenizer's EOS token.
    """

    seq_len: int
    stride: int
    pack: bool = False
    append_eos: bool = True

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if not 1 <= self.stride <= self.seq_len:
            raise ConfigError(f"stride must lie in [1, seq_len={self.seq_len}], got {self.stride}")


@dataclass(frozen=True)
class _Tok:
    token: int
    doc: int  # index into the live documents
    pos: int  # token position in the document
    char_start: int
    char_end: int


@dataclass(frozen=True)
class Chunk:
    """A training sequence: token ids and its metadata record."""

    input_ids: list[int]
    record: ExampleRecord


def _tokenize(tokenizer, doc: Document, doc_index: int, append_eos: bool) -> list[_Tok]:
    # A whole document, cut into seq_len windows below: the tokenizer's warning that it is
    # longer than the model's context does not apply (verbose=False).
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(enc["input_ids"])
    offsets = enc.get("offset_mapping") or [(0, len(doc.text))] * len(ids)
    toks = [
        _Tok(int(t), doc_index, i, int(s), int(e))
        for i, (t, (s, e)) in enumerate(zip(ids, offsets, strict=True))
    ]
    if append_eos and tokenizer.eos_token_id is not None:
        n = len(doc.text)
        toks.append(_Tok(int(tokenizer.eos_token_id), doc_index, len(ids), n, n))
    return toks


class Chunker:
    """Turns a document stream into numbered ``Chunk``s; counts what it saw."""

    def __init__(self, tokenizer, config: ChunkConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.n_documents = 0
        self.n_tokens = 0
        self.n_dropped = 0
        self._next_id = 0
        self._eos_text = tokenizer.eos_token or "\n"

    def chunks(self, documents: Iterable[Document]) -> Iterator[Chunk]:
        """Yield sequences in corpus order with dense ids 0, 1, ..."""
        cfg = self.config
        live: dict[int, Document] = {}
        buf: deque[_Tok] = deque()
        covered = 0  # leading tokens of buf already inside an emitted window
        prev: _Tok | None = None  # the token before buf[0], context for a 1-token tail
        for doc in documents:
            index = self.n_documents
            self.n_documents += 1
            toks = _tokenize(self.tokenizer, doc, index, cfg.append_eos)
            self.n_tokens += len(toks)
            if not toks:
                continue
            live[index] = doc
            if not cfg.pack:
                buf.clear()
                covered = 0
            for tok in toks:
                buf.append(tok)
                if len(buf) == cfg.seq_len:
                    yield from self._emit(list(buf), live)
                    for _ in range(cfg.stride):
                        prev = buf.popleft()
                    covered = len(buf)
            if not cfg.pack:
                if len(buf) > covered:
                    yield from self._emit(self._tail(buf, prev), live)
                buf.clear()
                covered = 0
                prev = None
                live.pop(index, None)
            else:
                first = buf[0].doc if buf else index + 1
                for d in [d for d in live if d < first]:
                    del live[d]
        if cfg.pack and len(buf) > covered:
            yield from self._emit(self._tail(buf, prev), live)

    @staticmethod
    def _tail(buf: deque[_Tok], prev: _Tok | None) -> list[_Tok]:
        """The last window; a lone token gets its predecessor as context so it is a target."""
        if len(buf) == 1 and prev is not None:
            return [prev, *buf]
        return list(buf)

    def _emit(self, window: list[_Tok], live: dict[int, Document]) -> Iterator[Chunk]:
        if len(window) < 2:
            self.n_dropped += 1
            return
        first = window[0].doc
        head = [t for t in window if t.doc == first]
        parts, doc_order = [], list(dict.fromkeys(t.doc for t in window))
        for d in doc_order:
            seg = [t for t in window if t.doc == d]
            parts.append(live[d].text[seg[0].char_start : max(t.char_end for t in seg)])
        doc = live[first]
        record = ExampleRecord(
            id=self._next_id,
            text=self._eos_text.join(parts) if len(parts) > 1 else parts[0],
            source=doc.source,
            document_id=doc.id,
            token_start=head[0].pos,
            token_end=head[-1].pos + 1,
            char_start=head[0].char_start,
            char_end=max(t.char_end for t in head),
        )
        self._next_id += 1
        yield Chunk([t.token for t in window], record)
