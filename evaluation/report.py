"""Write an evaluation result as JSON, a Markdown table and a PNG plot."""

from __future__ import annotations

import logging
from pathlib import Path

from evaluation.results import EvalResult
from evaluation.run import TAILPATCH_CUTOFFS

log = logging.getLogger(__name__)


def markdown_table(result: EvalResult) -> str:
    """One row per method: MRR@10, recall@10, mean tail-patch of the top 1/3/10 (nats) ± its
    standard error over queries (over several seeds: ± the standard deviation across seeds),
    tail-patch top-10 without the saturated queries, and MRR@10 and tail-patch top-10 on the
    facts the model learned in the query's wording."""
    tp_cols = [f"tail-patch top-{c}" for c in TAILPATCH_CUTOFFS]
    lines = [
        "| method | MRR@10 | recall@10 | "
        + " | ".join(tp_cols)
        + " | tail-patch top-10, unsaturated | MRR@10, learned | tail-patch top-10, learned |",
        "|---|---:|---:|" + "---:|" * len(tp_cols) + "---:|---:|---:|",
    ]
    for row in result.rows:
        spread = "_sd" if "seeds" in row else "_se"
        tp = " | ".join(
            f"{row[f'tailpatch_top{c}']:+.4f} ± {row.get(f'tailpatch_top{c}{spread}', 0.0):.4f}"
            for c in TAILPATCH_CUTOFFS
        )
        unsat = row.get("tailpatch_top10_unsaturated", float("nan"))
        mrr = f"{row['mrr']:.3f}" + (f" ± {row['mrr_sd']:.3f}" if "mrr_sd" in row else "")
        learned = (
            f"{row.get('mrr_learned', float('nan')):.3f} | "
            f"{row.get('tailpatch_top10_learned', float('nan')):+.4f}"
        )
        lines.append(
            f"| {row['method']} | {mrr} | {row['recall_at_10']:.3f} | {tp} | {unsat:+.4f} | "
            f"{learned} |"
        )
    return "\n".join(lines)


def paired_markdown(result: EvalResult) -> str:
    """TrackStar (and the product as served) minus each method per metric: mean, paired SE,
    bootstrap 95% interval."""
    parts = []
    for key, rows in result.paired.items():
        if not rows:
            continue
        reference, subset = rows[0].get("reference", "trackstar"), key.rpartition(", ")[2]
        parts += [
            f"Paired differences, {reference} minus method ({subset} queries, n = {rows[0]['n']}); "
            "an interval that excludes 0 is a difference the queries support:",
            "",
            "| method | metric | mean | SE | 95% CI |",
            "|---|---|---:|---:|---|",
        ]
        parts += [
            f"| {r['method']} | {r['metric']} | {r['mean']:+.4f} | {r['se']:.4f} | "
            f"[{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}] |"
            for r in rows
        ]
        parts.append("")
    return "\n".join(parts)


def markdown_report(result: EvalResult, command: str | None = None) -> str:
    """The full Markdown page: command, setup, table, method legend."""
    s, c = result.settings, result.context
    dims = c.get("method_dims") or {}
    parts = ["# Fact-tracing evaluation", ""]
    if command:
        parts += ["Produced by:", "", "```bash", command, "```", ""]
    parts += [
        f"- model: `{c.get('model_dir')}` (sha256 {str(c.get('model_hash', ''))[:12]}), "
        f"fact accuracy {c.get('fact_accuracy', float('nan')):.3f}",
        *(
            [
                f"- inputs: corpus sha256 {c['corpus_sha256'][:12]}, "
                f"queries sha256 {c['queries_sha256'][:12]}"
            ]
            if "corpus_sha256" in c
            else []
        ),
        f"- {c.get('n_train_sequences')} training sequences, {c.get('n_queries')} queries; "
        f"fingerprint d = {c.get('fingerprint_dim')} (k = {s['k']}), second moments: "
        f"{c.get('second_moments_source')}",
        *(
            ["- d per gradient method: " + ", ".join(f"{k} {v}" for k, v in dims.items())]
            if dims
            else []
        ),
        f"- tail-patch: one {s['tailpatch_optimizer']} step, lr {s['tailpatch_lr']:g}, on each "
        f"retrieved sequence alone; change of log p(completion | prompt) in nats, mean over "
        f"queries of the mean over the top 1/3/10; {c.get('n_tailpatch_pairs')} (query, sequence) pairs",
        f"- reference: tail-patch of the passages that state the fact (ground truth): "
        f"{c.get('oracle_tailpatch_relevant', float('nan')):+.4f}",
        f"- mixed-R lambda per query fold (paper App. A.1.3 rule): "
        f"{c.get('lambdas_by_fold', {}).get('trackstar', [])}",
        f"- saturated queries ({c.get('saturated_threshold', '')} before the step): "
        f"{c.get('saturated_fraction', float('nan')):.2f}"
        + (f"; projection seeds {c['seeds']}" if "seeds" in c else ""),
        f"- facts learned in the query's wording (greedy completion; the `learned` columns): "
        f"{len(c.get('learned_queries', []))} of {c.get('n_queries')}",
        f"- wall time {c.get('timings', {}).get('total_s', float('nan')):.0f} s",
        "",
        markdown_table(result),
        "",
        paired_markdown(result),
        "Methods:",
        "",
    ]
    parts += [f"- `{row['method']}`: {row['description']}" for row in result.rows]
    return "\n".join(parts) + "\n"


def plot(result: EvalResult, path: Path) -> None:
    """MRR and recall@10 (y) against tail-patch top-10 (x), one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "mrr", "MRR@10"), (axes[1], "recall_at_10", "recall@10")):
        for row in result.rows:
            x, y = row["tailpatch_top10"], row[key]
            ax.scatter(x, y)
            ax.annotate(
                row["method"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8
            )
        ax.set_xlabel("tail-patch, mean of top 10 (delta log p, nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Fact tracing: attribution vs influence per method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    result: EvalResult, out_dir: Path, *, stem: str = "eval", command: str | None = None
) -> list[Path]:
    """Write ``{stem}.json``, ``{stem}.md`` and ``{stem}.png`` into out_dir.

    Returns:
        The three paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(result.to_json() + "\n", encoding="utf-8")
    paths[1].write_text(markdown_report(result, command), encoding="utf-8")
    plot(result, paths[2])
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return paths
