"""POST /v1/influence/explain and the per-token attribution math behind it.

The math is checked against a brute force built from the slow reference (torch.func
gradient of each target token's NLL alone, dense projection, scipy whitening), and the
contributions must sum to the score e_q . e of the encoder's own fingerprints.
"""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch

from encoder.batching import Example, collate, sequence_example
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.optimizer_state import SecondMoments
from encoder.token_attribution import attribute_tokens, target_projections
from encoder.whitening import Whitener
from service.app import create_app
from service.settings import Settings
from tests.conftest import tiny_gpt2
from tests.encoder import reference as ref
from tests.service.live import live_server
from tests.service.test_openapi_clients import run_schemathesis
from tests.tolerances import assert_within, gamma, recompute_bound


def _random_ids(seed: int, n: int, lo: int, hi: int, vocab: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(
            1, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]


def _encoder(
    model, hessian: str, unit_norm: bool = True, projection: str = "gaussian"
) -> TrackStarEncoder:
    g = torch.Generator().manual_seed(2)
    v = {
        n: torch.rand(p.shape, generator=g, dtype=p.dtype) * 1e-2 + 1e-4
        for n, p in model.named_parameters()
    }
    cfg = FingerprintConfig(
        k=3, seed=7, correction=True, hessian=hessian, unit_norm=unit_norm, projection=projection
    )
    enc = TrackStarEncoder(
        model, cfg, second_moments=SecondMoments(v_hat=v, eps=1e-6, source="test")
    )
    if enc.needs_fit:
        enc.fit_basis([collate([sequence_example(x) for x in _random_ids(4, 12, 4, 12)])])
    if hessian != "none":
        stats = enc.new_statistics()
        stats.update(enc.project(collate([sequence_example(x) for x in _random_ids(3, 12, 4, 12)])))
        enc.set_whitener(
            Whitener.from_statistics(stats, None, lambda_=None, lambda_component=1 / 64, delta=1e-3)
        )
    return enc


def _query(enc: TrackStarEncoder, seed: int) -> torch.Tensor:
    ids = _random_ids(seed, 1, 5, 8)[0]
    q = Example(tuple(ids), tuple([False] * 3 + [True] * (len(ids) - 3)))
    return enc.encode(collate([q]))[0]


@pytest.mark.parametrize(
    "hessian,unit_norm,projection",
    [("none", True, "gaussian"), ("train", False, "gaussian"), ("train", True, "sketch")],
)
def test_contributions_sum_to_score(hessian, unit_norm, projection):
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    enc = _encoder(model, hessian, unit_norm, projection)
    e_q = _query(enc, 11)
    example = sequence_example(_random_ids(5, 1, 9, 9)[0])
    att = attribute_tokens(enc, example, e_q, chunk=3)  # chunk < n_targets: several passes
    assert att.score == pytest.approx(
        float(enc.encode(collate([example]))[0] @ e_q), abs=recompute_bound(stages=64)
    )
    assert att.contributions[0] == 0.0
    assert torch.count_nonzero(att.contributions[1:]) == len(example.input_ids) - 1


def test_contributions_sum_to_score_with_a_sketch():
    """The sketch's weight direction (W_out (S^T u) W_in, times C) carries its score too."""
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    enc = _encoder(model, "none", True, projection="sketch")
    assert any(
        not enc.family.whole(m) for m in enc.modules
    )  # some modules are hashed, not kept whole
    e_q = _query(enc, 11)
    example = sequence_example(_random_ids(5, 1, 9, 9)[0])
    att = attribute_tokens(enc, example, e_q, chunk=3)
    assert att.score == pytest.approx(
        float(enc.encode(collate([example]))[0] @ e_q), abs=recompute_bound(stages=64)
    )


@pytest.mark.parametrize("projection", ["gaussian", "sketch"])
def test_contributions_match_brute_force(projection):
    """Whitened, unit norm: each target's NLL alone through the independent reference."""
    model = tiny_gpt2(seed=1, dtype=torch.float64)
    enc = _encoder(model, "train", projection=projection)
    e_q = _query(enc, 11)
    example = sequence_example(_random_ids(5, 1, 7, 7)[0])
    att = attribute_tokens(enc, example, e_q, chunk=4)
    assert att.score == pytest.approx(
        float(enc.encode(collate([example]))[0] @ e_q), abs=recompute_bound(stages=64)
    )

    sm = enc.second_moments
    n = len(example.input_ids)
    if projection == "sketch":
        kw = dict(plan=enc.plan, roots=enc.family.whitening(), seed=7, v_hat=sm.v_hat, eps=sm.eps)
        phi = ref.reference_sketch_phi
    else:
        kw, phi = dict(k=3, seed=7, v_hat=sm.v_hat, eps=sm.eps), ref.reference_phi
    parts = np.stack(
        [
            phi(
                model,
                enc.modules,
                Example(example.input_ids, tuple(i == t for i in range(n))),
                **kw,
            )
            for t in range(1, n)
        ]
    )
    starts = np.cumsum([0, *enc.block_dims[:-1]])
    parts = np.concatenate(
        [
            parts[:, s : s + d] @ w.numpy()
            for s, d, w in zip(starts, enc.block_dims, enc.whitener.matrices, strict=True)
        ],
        axis=1,
    )
    brute = parts @ e_q.numpy() / np.linalg.norm(parts.sum(0))
    # float64 weights, softmax in float32 (transformers): the reference runs each target alone.
    scale = np.abs(parts).sum(0) @ np.abs(e_q.numpy()) / np.linalg.norm(parts.sum(0))
    assert np.abs(att.contributions[1:].numpy() - brute).max() <= recompute_bound(stages=64) * scale
    assert att.contributions.sum() == pytest.approx(
        brute.sum(), abs=recompute_bound(stages=64) * scale
    )


def test_float32_parts_sum_to_projection():
    """In float32 (the service's dtype) the parts rebuild phi and the score (bounds from the arithmetic)."""
    model = tiny_gpt2(seed=4, n_embd=16)
    enc = _encoder(model, "train")
    example = sequence_example(_random_ids(9, 1, 20, 20)[0])
    positions, parts = target_projections(enc, example)
    assert positions == list(range(1, 20))
    phi = enc.project(collate([example]))[0]
    # 19 float32 parts summed (gamma_19 of their magnitudes), each from its own pass.
    bound = gamma(len(parts)) * parts.abs().sum(0) + recompute_bound() * float(phi.abs().max())
    assert_within(parts.sum(0), phi, bound, "parts")
    e_q = _query(enc, 12)
    att = attribute_tokens(enc, example, e_q)
    assert att.score == pytest.approx(
        float(enc.encode(collate([example]))[0] @ e_q), abs=recompute_bound()
    )
    assert_within(
        att.fingerprint.float(), enc.encode(collate([example]))[0], recompute_bound(), "fingerprint"
    )


# -- the endpoint, over real HTTP on the trained test index ----------------------------------


@pytest.fixture(scope="module")
def server(tiny_index):
    settings = Settings(
        index_dir=tiny_index, max_completion_tokens=16
    )  # as test_explain_schemathesis's
    with live_server(create_app(settings)) as base:
        yield httpx.Client(base_url=base, timeout=120)


@pytest.fixture(scope="module")
def query(fact_corpus):
    q = fact_corpus.queries[0]
    return {"prompt": q.prompt, "completion": q.completion}


def test_explain_endpoint_splits_the_result_score(server, query):
    """The default index re-scores: a card shows the exact score, which its explanation
    splits; ``index_score`` is the stored fingerprint's, the first stage's score."""
    hits = server.post("/v1/influence", json={**query, "k": 2}).json()["results"]
    first = server.post("/v1/influence", json={**query, "k": 50, "rescore": 0}).json()["results"]
    first_scores = {h["id"]: h["score"] for h in first}
    for hit in hits:
        r = server.post("/v1/influence/explain", json={**query, "id": hit["id"]})
        assert r.status_code == 200, r.text
        body = r.json()
        contributions = [t["contribution"] for t in body["tokens"]]
        assert sum(contributions) == pytest.approx(
            body["score"],
            abs=gamma(len(contributions), np.float64) * sum(map(abs, contributions)) + 1e-15,
        )
        # The recomputed example is the indexed one: same fingerprint, same score.
        assert body["fingerprint_agreement"] > 0.9999
        assert body["exact"]
        # Two float32 recomputations of the exact score, in other batch shapes.
        assert body["score"] == pytest.approx(hit["score"], abs=2 * recompute_bound())
        assert body["index_score"] == pytest.approx(first_scores[hit["id"]], abs=recompute_bound())
        # Tokens tile the example's text in order.
        text = server.get(f"/v1/examples/{hit['id']}").json()["text"]
        spans = [t for t in body["tokens"] if t["end"] > t["start"]]
        assert "".join(text[t["start"] : t["end"]] for t in spans) == text
        assert all(t["text"] == text[t["start"] : t["end"]] for t in spans)
        assert contributions[0] == 0.0


def test_explain_errors(server, query):
    r = server.post("/v1/influence/explain", json={**query, "id": 10**9})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == server.get(f"/v1/examples/{10**9}").json()["error"]["code"]
    r = server.post("/v1/influence/explain", json={**query, "completion": " x" * 40, "id": 0})
    assert r.status_code == 413 and r.json()["error"]["details"]["limit"] == 16
    r = server.post("/v1/influence/explain", json={"prompt": "a", "completion": "", "id": 0})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"


def test_explain_refuses_examples_over_the_token_cap(server, query, monkeypatch):
    import engine.explain

    monkeypatch.setattr(engine.explain, "MAX_EXPLAIN_TOKENS", 3)
    r = server.post("/v1/influence/explain", json={**query, "id": 0})
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "input_too_long" and error["details"]["field"] == "id"
    assert error["details"]["limit"] == 3 and error["details"]["n_tokens"] > 3


@pytest.mark.slow
def test_explain_schemathesis(server, tiny_index):
    """schemathesis on the explain route alone (the service's run leaves it out): no 5xx,
    responses match the documented schema, valid input accepted and invalid input refused;
    bounded examples."""
    settings = Settings(index_dir=tiny_index, max_completion_tokens=16)  # the server's
    run_schemathesis(
        str(server.base_url),
        settings,
        "--phases",
        "examples,coverage",
        "--include-path",
        "/v1/influence/explain",
        max_examples=5,
        timeout=240,
    )


def test_metadata_keeps_the_indexed_token_ids(tiny_index, tmp_path):
    """The tokens table holds the ids each sequence was indexed with: encoding them gives the
    stored fingerprint back. A store without the table (format 1) is refused."""
    import shutil
    import sqlite3

    from api.errors import ArtifactError, NotFoundError
    from engine.index import InfluenceIndex, OpenOptions
    from indexer import manifest as mf
    from indexer.metadata import MetadataStore

    index = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu"))
    try:
        ids = [index.token_ids(i) for i in range(index.size)]
        assert all(len(x) >= 2 for x in ids)
        rows = [index.example(i) for i in range(index.size)]
        assert [len(x) for x in ids] == [r.token_end - r.token_start for r in rows]
        pad = int(index.tokenizer.pad_token_id or 0)
        rebuilt = torch.cat(
            [
                index.encoder.encode(collate([sequence_example(x) for x in ids[s : s + 16]], pad))
                for s in range(0, len(ids), 16)
            ]
        ).double()
        stored = torch.from_numpy(np.asarray(index.fingerprints, dtype=np.float64))
        cos = (rebuilt * stored).sum(1) / (rebuilt.norm(dim=1) * stored.norm(dim=1))
        assert cos.min().item() > 0.9999
        with pytest.raises(NotFoundError):
            index.token_ids(index.size)
    finally:
        index.close()

    old = tmp_path / "metadata.sqlite"
    shutil.copyfile(tiny_index / mf.METADATA, old)
    with sqlite3.connect(old) as conn:
        conn.execute("DROP TABLE tokens")
    with pytest.raises(ArtifactError) as err:
        MetadataStore(old)
    assert err.value.code == "format_version"


def test_explain_uses_the_indexed_ids_where_the_text_tokenizes_otherwise(tiny_index):
    """A window cut inside a word is indexed with ids its text alone would not produce: the
    explanation runs on the indexed ids, with spans from decoding their prefixes."""
    from dataclasses import replace

    from engine.explain import sequence_tokens
    from engine.index import InfluenceIndex, OpenOptions

    index = InfluenceIndex.open(tiny_index, OpenOptions(device="cpu"))
    try:
        tok = index.tokenizer
        record = index.example(0)
        text_ids = tok(record.text, add_special_tokens=False)["input_ids"]
        split = (
            [i for i in text_ids[:1]]
            + tok(" ", add_special_tokens=False)["input_ids"]
            + list(text_ids[1:])
        )
        record = replace(record, token_start=0, token_end=len(split))
        seq = sequence_tokens(tok, record, split)
        assert seq.input_ids == split != list(text_ids)
        ends = [e for _, e in seq.spans]
        assert ends == sorted(ends) and ends[-1] <= len(record.text)
        assert all(s <= e for s, e in seq.spans)
        same = sequence_tokens(tok, replace(record, token_end=len(text_ids)), list(text_ids))
        enc = tok(record.text, add_special_tokens=False, return_offsets_mapping=True)
        assert same.spans == [tuple(o) for o in enc["offset_mapping"]]  # the text's own spans kept
    finally:
        index.close()


def test_explain_is_admitted_boundedly(tiny_index, query, monkeypatch):
    """Explanations beyond ``max_explains`` are refused at once with 503 + Retry-After."""
    import threading

    import service.routes.explain

    real = service.routes.explain.explain
    entered, release = threading.Event(), threading.Event()

    def held(*args, **kwargs):  # the admitted explanation runs until the others were answered
        entered.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(service.routes.explain, "explain", held)
    settings = Settings(index_dir=tiny_index, max_explains=1)
    with live_server(create_app(settings)) as base:
        statuses = []

        def call():
            r = httpx.post(f"{base}/v1/influence/explain", json={**query, "id": 0}, timeout=60)
            statuses.append(
                (r.status_code, r.headers.get("retry-after"), r.json().get("error", {}).get("code"))
            )

        first = threading.Thread(target=call)
        first.start()
        assert entered.wait(30)
        others = [threading.Thread(target=call) for _ in range(5)]
        for t in others:
            t.start()
        for t in others:
            t.join()
        refused_while_held = len(statuses)
        release.set()
        first.join()
    assert refused_while_held == 5  # answered at once, while the admitted one was still held
    assert sorted(s for s, _, _ in statuses) == [200] + [503] * 5, statuses
    assert all(
        ra is not None and code == "explain_overloaded" for s, ra, code in statuses if s == 503
    )


class RecordingLock:
    """The index's model lock, recording who asked for it and who got it, in order."""

    def __init__(self, inner) -> None:
        self.inner, self.events, self._guard = inner, [], threading.Lock()

    def _log(self, what: str) -> None:
        with self._guard:
            self.events.append((what, threading.current_thread().name))

    def __enter__(self):
        self._log("ask")
        self.inner.__enter__()
        self._log("got")
        return self

    def __exit__(self, *exc):
        self._log("release")
        return self.inner.__exit__(*exc)


def test_queries_interleave_with_an_explanation(tiny_index, query):
    """While queries flow, an explanation takes the model one short pass at a time, in FIFO
    order with the queries: no query ever waits behind more than one explanation pass, and
    queries run between the explanation's passes. Judged from the lock's own record of who
    asked and who got it (no timing: the latency this buys is in bench_explain)."""
    app = create_app(Settings(index_dir=tiny_index))
    with live_server(app) as base, httpx.Client(base_url=base, timeout=120) as client:
        longest = max(range(20), key=lambda i: len(client.get(f"/v1/examples/{i}").json()["text"]))
        index = app.state.services.index_state.current
        lock = index.encode_lock = RecordingLock(index.encode_lock)
        assert client.post("/v1/influence", json=query).status_code == 200  # queries are flowing
        done = threading.Event()

        def explain_once(out):
            with httpx.Client(base_url=base, timeout=120) as other:
                out.append(other.post("/v1/influence/explain", json={**query, "id": longest}))
            done.set()

        result: list = []
        thread = threading.Thread(target=explain_once, args=(result,))
        thread.start()
        n = 0
        while not done.is_set():
            r = client.post("/v1/influence", json={**query, "prompt": f"{query['prompt']} {n}"})
            assert r.status_code == 200
            n += 1
        thread.join()
    assert result and result[0].status_code == 200, result
    events = list(lock.events)
    explainer = {
        name for what, name in events if what == "got" and not name.startswith("influence-batch")
    }
    passes = [i for i, (what, name) in enumerate(events) if what == "got" and name in explainer]
    queries = [
        i
        for i, (what, name) in enumerate(events)
        if what == "got" and name.startswith("influence-batch")
    ]
    assert len(passes) > 2, "the explanation held the model in one piece"
    between = [i for i in queries if passes[0] < i < passes[-1]]
    assert between, f"no query ran during the explanation's {len(passes)} passes ({n} queries sent)"
    for name in {name for what, name in events if name.startswith("influence-batch")}:
        asked = None
        for i, (what, who) in enumerate(events):
            if who != name:
                continue
            if what == "ask":
                asked = i
            elif what == "got":
                waited = sum(1 for j in passes if asked < j < i)
                assert waited <= 1, f"a query waited behind {waited} explanation passes"


@pytest.mark.parametrize(
    "hessian,unit_norm,projection,correction",
    [
        ("none", True, "gaussian", True),
        ("train", True, "gaussian", True),
        ("train", False, "gaussian", False),
        ("train", True, "sketch", True),
        ("none", True, "sketch", False),
    ],
)
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_forward_mode_attribution_equals_one_pass_per_target(
    hessian, unit_norm, projection, correction, attention, monkeypatch
):
    """c_t from one JVP along the weight direction of R^-1/2 e_q equals phi of each target's
    own backward pass dotted with e_q (float64 weights; softmax in float32 on both sides)."""
    from encoder import token_attribution

    model = tiny_gpt2(seed=1, dtype=torch.float64)
    model.config._attn_implementation = attention
    enc = _encoder(model, hessian, unit_norm, projection)
    if not correction:
        config = FingerprintConfig(
            k=3,
            seed=7,
            hessian=hessian,
            unit_norm=unit_norm,
            correction=False,
            projection=projection,
        )
        uncorrected = TrackStarEncoder(model, config, whitener=enc.whitener)
        uncorrected.family.restore(enc.family.tensors())
        enc = uncorrected
    e_q = _query(enc, 11)
    example = sequence_example(_random_ids(5, 1, 12, 12)[0])
    with monkeypatch.context() as m:  # the fast path must not fall back to the copies
        m.setattr(token_attribution, "target_projections", lambda *a, **k: pytest.fail("fell back"))
        fast = attribute_tokens(enc, example, e_q, method="jvp")
    slow = attribute_tokens(enc, example, e_q, method="copies", chunk=4)
    scale = float(slow.contributions.abs().sum())
    assert_within(
        fast.contributions, slow.contributions, recompute_bound(stages=64) * scale, "contributions"
    )
    assert fast.score == pytest.approx(slow.score, abs=recompute_bound(stages=64) * scale)
    assert_within(fast.fingerprint, slow.fingerprint, recompute_bound(stages=64), "fingerprint")
