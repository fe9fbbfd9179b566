"""``influence index spectrum``: the eigenvalue curves behind an index's lambda (paper App.
A.1.3) and the lambda other component choices would have given.

The rule pools the eigenvalues of every block of R_train and of R_eval, sorts each set,
and takes lambda = s_train[c] / (s_eval[c] + s_train[c]) at c = component * d (default
d / 64), so that the two terms weigh the same there. Across corpora it came out anywhere
in 0.0004 .. 0.998; this shows where, and how much it depends on c.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from encoder.config import FingerprintConfig
from encoder.errors import ArtifactError
from encoder.whitening import RStatistics, lambda_at, pooled_eigenvalues
from indexer import manifest as mf

COMPONENTS = (1 / 256, 1 / 64, 1 / 16, 1 / 4)


def spectrum(index_dir: Path) -> dict[str, Any]:
    """Eigenvalue curves (descending) of R_train and R_eval, and lambda per component choice.

    Raises:
        ArtifactError: code ``no_hessian`` for an index without R (hessian none), or
            ``no_eval_statistics`` without R_eval (hessian train or no --queries).
    """
    manifest = mf.Manifest.read(index_dir)
    config = FingerprintConfig.from_dict(manifest.fingerprint["config"])
    if config.hessian == "none":
        raise ArtifactError(f"{index_dir} was built with hessian none: it has no R", code="no_hessian")
    if not (index_dir / mf.R_EVAL).is_file():
        raise ArtifactError(f"{index_dir} has no R_eval (hessian train, or built without --queries): "
                            "lambda is 0 by construction", code="no_eval_statistics")  # fmt: skip
    s_train = pooled_eigenvalues(RStatistics.load(index_dir / mf.R_TRAIN).means())
    s_eval = pooled_eigenvalues(RStatistics.load(index_dir / mf.R_EVAL).means())
    return {
        "index": str(index_dir), "d": int(s_train.numel()), "lambda": manifest.fingerprint["lambda"],
        "component": config.lambda_component, "lambda_by_component": {
            f"d/{round(1 / c)}": lambda_at(s_train, s_eval, c) for c in COMPONENTS},
        "s_train": s_train.tolist(), "s_eval": s_eval.tolist(),
    }  # fmt: skip


def plot(data: dict[str, Any], path: Path) -> None:
    """Both curves on a log scale, the rule's component marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("s_train", "R_train"), ("s_eval", "R_eval")):
        values = [max(v, 1e-30) for v in data[key]]
        ax.plot(range(1, len(values) + 1), values, label=label)
    c = int(data["component"] * data["d"])
    ax.axvline(c + 1, color="grey", linestyle="--", linewidth=0.8)
    ax.annotate(f"c = {c}: lambda = {data['lambda']:.4f}", (c + 1, ax.get_ylim()[1]), fontsize=8,
                textcoords="offset points", xytext=(4, -12))  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="component (pooled over blocks, descending)",
           ylabel="eigenvalue", title="R_train and R_eval spectra (paper App. A.1.3)")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
