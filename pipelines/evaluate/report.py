"""The sampler report: how few steps reach DDPM-1000's quality? One evaluation per (sampler, steps), a markdown
table and a plot of FD-cls / floor against steps."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pipelines.evaluate.quality import EvalSettings, Evaluation

# The sampler report's rows: (sampler, steps).
REPORT_ROWS = (("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("dpm++", 10), ("dpm++", 20))


@dataclass
class Report:
    evaluations: list["Evaluation"]
    markdown: str
    plot_png: bytes


def sampler_report(base: "EvalSettings", run: Callable[["EvalSettings"], "Evaluation"], *, rows=REPORT_ROWS,
                   tolerance: float = 0.1) -> Report:
    """Evaluate every (sampler, steps) of ``rows`` on the same seeds and labels; a markdown table and a plot.

    ``run(settings)`` evaluates one row (in this process or on actors: the caller decides). The answer line names
    the cheapest row whose FD-cls is within ``tolerance`` (10%) of DDPM-1000's, or better.
    """
    evaluations = [run(replace(base, sampler=s, steps=k)) for s, k in rows]
    return Report(evaluations, report_markdown(evaluations, tolerance), report_plot(evaluations))


def report_markdown(evaluations: list["Evaluation"], tolerance: float = 0.1) -> str:
    """The report's table, and which row is the fewest steps at DDPM-1000's quality."""
    first = evaluations[0]
    lines = [f"n = {first.settings.num_samples:,} samples per row, seeds {first.settings.seed}.."
             f"{first.settings.seed + first.settings.num_samples - 1}, {first.settings.weights.upper()} weights, "
             f"guidance {first.settings.guidance_scale:g}; FD-cls floor (held-out vs train) "
             f"{first.metrics['fd_cls_floor']:.3f}, precision/recall floor {first.metrics['precision_floor']:.3f}/"
             f"{first.metrics['recall_floor']:.3f}.", "",
             "| sampler | steps | FD-cls | ratio to floor | precision | recall | images/s |",
             "|---|---|---|---|---|---|---|"]
    for e in evaluations:
        m = e.metrics
        lines.append(f"| {e.settings.sampler} | {e.settings.steps} | {m['fd_cls']:.3f} | {m['fd_cls_ratio']:.2f} | "
                     f"{m['precision']:.3f} | {m['recall']:.3f} | {m['images_per_s']:.1f} |")
    ddpm = next((e for e in evaluations if (e.settings.sampler, e.settings.steps) == ("ddpm", 1000)), None)
    if ddpm is not None:
        target = ddpm.metrics["fd_cls"] * (1 + tolerance)
        good = [e for e in evaluations if e is not ddpm and e.metrics["fd_cls"] <= target]
        lines.append("")
        if good:
            best = min(good, key=lambda e: (e.settings.steps, e.metrics["fd_cls"]))
            lines.append(f"Fewest steps at DDPM-1000's quality (FD-cls within {tolerance:.0%} of "
                         f"{ddpm.metrics['fd_cls']:.3f}, or better): {best.settings.sampler} with "
                         f"{best.settings.steps} steps (FD-cls {best.metrics['fd_cls']:.3f}, "
                         f"{best.metrics['images_per_s'] / ddpm.metrics['images_per_s']:.0f}x the images/s).")
        else:
            lines.append(f"No row with fewer steps comes within {tolerance:.0%} of DDPM-1000's FD-cls "
                         f"({ddpm.metrics['fd_cls']:.3f}).")
    return "\n".join(lines) + "\n"


def report_plot(evaluations: list["Evaluation"]) -> bytes:
    """PNG: FD-cls ratio to the floor against steps (log scale), one line per sampler."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for sampler in dict.fromkeys(e.settings.sampler for e in evaluations):
        rows = sorted((e.settings.steps, e.metrics["fd_cls_ratio"]) for e in evaluations
                      if e.settings.sampler == sampler)
        ax.plot(*zip(*rows), marker="o", label=sampler)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="floor (real vs real)")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FD-cls / floor")
    ax.set_title(f"Sample quality against steps (n = {evaluations[0].settings.num_samples})")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
