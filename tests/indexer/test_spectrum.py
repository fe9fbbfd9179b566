"""``influence index spectrum``: the eigenvalue curves reproduce the index's own lambda,
alternative component choices are reported, and indexes without R are refused (exit 2)."""

from __future__ import annotations

import json
import shutil

import pytest

from indexer import manifest as mf
from service.cli import main


def test_spectrum_reproduces_the_built_lambda(tiny_index, tmp_path, capsys):
    png = tmp_path / "spectrum.png"
    assert main(["index", "spectrum", str(tiny_index), "--json", "--out", str(png)]) == 0
    data = json.loads(capsys.readouterr().out.splitlines()[0])
    built = json.loads((tiny_index / mf.MANIFEST).read_text())["fingerprint"]["lambda"]
    assert data["lambda_by_component"]["d/64"] == pytest.approx(built, rel=1e-9)
    assert set(data["lambda_by_component"]) == {"d/256", "d/64", "d/16", "d/4"}
    assert all(0.0 <= v <= 1.0 for v in data["lambda_by_component"].values())
    for key in ("s_train", "s_eval"):
        assert len(data[key]) == data["d"] and data[key] == sorted(data[key], reverse=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("drop,code", [("hessian", "no R"), ("r_eval", "no R_eval")])
def test_indexes_without_the_statistics_are_refused(tiny_index, tmp_path, capsys, drop, code):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_index, copy)
    if drop == "hessian":
        m = json.loads((copy / mf.MANIFEST).read_text())
        m["fingerprint"]["config"]["hessian"] = "none"
        (copy / mf.MANIFEST).write_text(json.dumps(m))
    else:
        (copy / mf.R_EVAL).unlink()
    assert main(["index", "spectrum", str(copy)]) == 2
    assert code in capsys.readouterr().err
