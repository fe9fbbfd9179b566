"""``influence index plan``: each term of the estimate against the bytes a real encoder holds
(the family's state, the statistics, the dims), from the config alone; and the command."""

from __future__ import annotations

import json

import pytest
import torch

from encoder.basis import basis_bytes
from encoder.batching import sequence_example
from encoder.config import FingerprintConfig
from encoder.fingerprint import TrackStarEncoder
from encoder.rescoring import ExactRescorer
from indexer.plan import build_plan, parse_size
from service.cli import main
from tests.conftest import tiny_gpt2


def _terms(plan) -> dict[str, int]:
    return {(t.name, t.phase): t.bytes for t in plan.terms}


@pytest.mark.parametrize(
    "fp",
    [
        FingerprintConfig(budget=1200, max_block=200),
        FingerprintConfig(budget=1200, max_block=200, whiten=True),
        FingerprintConfig(k=3, projection="gaussian", correction=True),
    ],
    ids=["sketch-budget", "sketch-whitened", "gaussian-k3"],
)
def test_the_state_terms_are_what_a_real_encoder_holds(fp, tmp_path):
    model = tiny_gpt2(seed=1)
    model.config.save_pretrained(tmp_path)
    sizes = {"seq_len": 16, "batch_size": 2, "sequences": 10}
    plan = build_plan(tmp_path, fp, dtype=torch.float32, device="cpu", memory=None, **sizes)
    enc = TrackStarEncoder(model, fp)
    terms = _terms(plan)
    assert plan.dim == enc.dim and plan.params == sum(p.numel() for p in model.parameters())
    assert terms[("weights", "both")] == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    assert terms[("fingerprints", "both")] == 2 * enc.dim * 10
    if fp.projection == "sketch":
        hashes = enc.family.hashes.values()  # a sketch with some modules kept whole
        assert 0 < len(hashes) < len(enc.modules)
        assert terms[("sketch hash", "both")] == sum(i.nbytes + s.nbytes for i, s in hashes)
        if fp.whiten:
            enc.family.placeholder()  # a whitening of the fitted one's shapes
            roots = enc.family.whitening() or {}
            whitening = sum(a.nbytes + b.nbytes for a, b in roots.values())
            assert terms[("whitening", "both")] == whitening
            assert terms[("whitening statistics", "build")] == basis_bytes(enc.modules, enc.plan)
        else:  # the plain sketch: identity sides, nothing fitted
            assert not {name for name, _ in terms} & {"whitening", "whitening statistics"}
        # The second stage keeps of a seq_len-token query what the plan says.
        rescorer = ExactRescorer(model, fp, None, enc.family.whitening())
        scorer = rescorer.for_query(sequence_example(list(range(1, 17))), pad_id=0)
        kept = [k if isinstance(k, torch.Tensor) else k[0] for k in scorer.q_factors.values()]
        kept += [k[1] for k in scorer.q_factors.values() if not isinstance(k, torch.Tensor)]
        assert terms[("query factors", "serve")] == sum(t.nbytes for t in kept)
    else:
        pairs = enc.family.pairs.values()
        assert terms[("projection pairs", "both")] == sum(a.nbytes + b.nbytes for a, b in pairs)
        tracked = sum(m.out_features * m.in_features for m in enc.modules)
        assert terms[("correction", "both")] == 4 * tracked


def test_on_an_accelerator_the_hash_is_made_at_each_use(tmp_path):
    """A CUDA plan counts the temporaries of the largest module's hash, not a kept hash."""
    model = tiny_gpt2(seed=1)
    model.config.save_pretrained(tmp_path)
    fp = FingerprintConfig(budget=1200, max_block=200)
    sizes = {"seq_len": 16, "batch_size": 2, "sequences": 10}
    kept, made = (
        _terms(build_plan(tmp_path, fp, dtype=torch.float32, device=d, memory=None, **sizes))
        for d in ("cpu", "cuda")
    )
    enc = TrackStarEncoder(model, fp)
    hashed = [m.out_features * m.in_features for m in enc.modules if m.name in enc.family.hashed]
    assert kept[("sketch hash", "both")] == 9 * sum(hashed)
    assert made[("sketch hash", "both")] == 32 * max(hashed)


def test_auto_sizes_the_build_batch_and_the_candidates_per_pass_to_the_memory(tmp_path):
    """``--batch-size auto`` takes the batch the build's auto rule takes on a device of that
    memory (its fraction of what the resident terms leave, less the gradient chunk), and on
    an accelerator the exact stage's candidates per pass are sized the same way, at most
    CANDIDATE_BATCH; the totals then fit. Without a memory, auto is refused."""
    from api.errors import ConfigError
    from encoder.memory import DEFAULT_FRACTION
    from encoder.rescoring import CANDIDATE_BATCH

    tiny_gpt2(seed=1).config.save_pretrained(tmp_path)
    fp = FingerprintConfig(budget=1200, max_block=200)
    sizes = {"seq_len": 64, "sequences": 10}
    one = build_plan(
        tmp_path, fp, dtype=torch.float32, device="cuda", memory=None, batch_size=1, **sizes
    )
    terms = {(t.name, t.phase): t.bytes for t in one.terms}
    per, chunk = terms[("activations", "build")], terms[("gradient chunk", "both")]
    resident = one.total("build") - per - chunk
    for batches in (3, 5, 40):
        memory = int(resident + (chunk + batches * per + per // 2) / DEFAULT_FRACTION)
        plan = build_plan(
            tmp_path, fp, dtype=torch.float32, device="cuda", memory=memory, batch_size=0, **sizes
        )
        assert plan.batch_size == (batches if batches < 8 else batches - batches % 8)
        assert plan.fits("build") and plan.fits("serve")
        assert 1 <= plan.candidate_batch <= CANDIDATE_BATCH
        serve = {(t.name, t.phase): t.bytes for t in plan.terms}[("activations", "serve")]
        assert serve == plan.candidate_batch * per  # activations are linear in the tokens
    cpu = build_plan(
        tmp_path, fp, dtype=torch.float32, device="cpu", memory=memory, batch_size=8, **sizes
    )
    assert cpu.batch_size == 8 and cpu.candidate_batch == CANDIDATE_BATCH
    with pytest.raises(ConfigError, match="--memory"):
        build_plan(
            tmp_path, fp, dtype=torch.float32, device="cuda", memory=None, batch_size=0, **sizes
        )


def test_the_command_says_whether_it_fits(tmp_path, capsys):
    tiny_gpt2(seed=1).config.save_pretrained(tmp_path)
    argv = ["index", "plan", "--model", str(tmp_path), "--seq-len", "16", "--sequences", "100"]
    assert main([*argv, "--memory", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "build on the cpu" in out and "(fits)" in out and "flops per token" in out
    assert main([*argv, "--memory", "1KB"]) == 0
    assert "(does NOT fit)" in capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in data["terms"]} >= {"weights", "sketch hash", "activations"}
    assert main([*argv, "--whiten", "--json"]) == 0  # the whitened sketch adds its whitening
    whitened = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in whitened["terms"]} - {t["name"] for t in data["terms"]} == {
        "whitening",
        "whitening statistics",
    }
    assert main([*argv, "--memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--memory" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--batch-size", "auto"]) == 2  # auto sizes to a --memory
    assert "--memory" in capsys.readouterr().err
    assert main([*argv, "--batch-size", "auto", "--memory", "1GB"]) == 0
    assert "(auto: the largest batch that fits)" in capsys.readouterr().out
    assert main(["index", "plan", "--model", str(tmp_path / "nothing")]) == 2


def test_sizes_parse_in_binary_units():
    assert parse_size("80GB") == parse_size("80 GiB") == 80 * 2**30
    assert parse_size("512M") == 512 * 2**20 and parse_size("1048576") == 2**20


def test_a_gpu_build_that_does_not_fit_is_refused_before_any_pass(tmp_path):
    """The preflight's device check sums the plan's build terms; what does not fit is refused
    naming its largest terms and the change to make (the encoder is told it is on a GPU)."""
    from api.errors import ConfigError
    from indexer import preflight
    from indexer.build_config import BuildConfig

    model = tiny_gpt2(seed=1)
    enc = TrackStarEncoder(model, FingerprintConfig())
    enc.device = torch.device("cuda", 0)
    cfg = BuildConfig(
        model=tmp_path, corpus=tmp_path, out=tmp_path / "ix", seq_len=32, batch_size=4
    )
    terms = {t.name: t.bytes for t in preflight_terms(enc, cfg)}
    assert "runtime" not in terms  # the measured free memory has already left it out
    need = sum(terms.values())
    preflight.check_device(cfg, enc, free=int(need / preflight.MEMORY_FRACTION) + 1)  # fits
    with pytest.raises(ConfigError) as err:
        preflight.check_device(cfg, enc, free=need // 2)
    assert err.value.code == "insufficient_memory"
    largest = max(terms, key=terms.__getitem__)
    assert largest in err.value.message and "influence index plan" in err.value.message
    auto = BuildConfig(
        model=tmp_path, corpus=tmp_path, out=tmp_path / "ix", seq_len=32, batch_size=0
    )
    assert "activations" in terms and "activations" not in {
        t.name for t in preflight_terms(enc, auto)
    }
    enc.device = torch.device("cpu")  # the CPU's host checks hold the large terms
    preflight.check_device(cfg, enc, free=1)


def preflight_terms(enc, cfg):
    from indexer.plan import build_device_terms

    sizes = {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size}
    return build_device_terms(
        enc.model, enc.modules, cfg.fingerprint, enc.plan, device="cuda", **sizes
    )
