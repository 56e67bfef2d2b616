"""Reports over several evaluations, each a markdown table and a plot:

- the sampler report: how few steps reach DDPM-1000's quality? One evaluation per (sampler, steps), FD-cls / floor
  against steps;
- the guidance sweep of a text model: one evaluation per guidance scale w, alignment against FD-cls / floor (guidance
  trades fidelity and diversity for following the prompt: Ho & Salimans 2022's curve, with alignment on the axis
  where they had Inception score)."""

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
    name: str = "report"  # its files: <name>.md, <name>.png


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


# ---------------------------------------------------------------------------------------------------------------
# The guidance sweep

SWEEP_ALIGNMENT = ("align_seen_all", "align_held_out_all")  # the plot's y values, one line each


def guidance_report(base: "EvalSettings", run: Callable[["EvalSettings"], "Evaluation"],
                    scales: list[float]) -> Report:
    """Evaluate a text model at every guidance scale of ``scales`` on the same seeds and prompts; each evaluation's
    row is named ``<sampler><steps>_w<scale>`` (``ddim50_w3``)."""
    evaluations = []
    for w in scales:
        e = run(replace(base, guidance_scale=float(w)))
        e.suffix = f"_w{w:g}"
        evaluations.append(e)
    return Report(evaluations, sweep_markdown(evaluations), sweep_plot(evaluations), name="guidance")


def sweep_markdown(evaluations: list["Evaluation"]) -> str:
    first = evaluations[0]
    s = first.settings
    lines = [f"Guidance sweep: {s.sampler} {s.steps} steps, n = {s.num_samples:,} samples for FD-cls (floor "
             f"{first.metrics['fd_cls_floor']:.3f}), {first.identity.get('alignment_prompts', '?')} evaluation "
             f"prompts x {first.identity.get('images_per_prompt', '?')} images for alignment, seed {s.seed}.", "",
             "| w | FD-cls | ratio to floor | recall | align seen | align held-out | colour | shape | relation | "
             "CLIP score |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in evaluations:
        m = e.metrics
        cells = [f"{m[k]:.3f}" if k in m else "-" for k in ("align_seen_all", "align_held_out_all",
                                                                  "align_seen_colour", "align_seen_shape",
                                                                  "align_seen_relation")]
        clip = f"{m['clip_score']:.2f}" if "clip_score" in m else "-"
        lines.append(f"| {e.settings.guidance_scale:g} | {m['fd_cls']:.3f} | {m['fd_cls_ratio']:.2f} | "
                     f"{m['recall']:.3f} | {' | '.join(cells)} | {clip} |")
    return "\n".join(lines) + "\n"


def sweep_plot(evaluations: list["Evaluation"]) -> bytes:
    """PNG: alignment (seen and held-out compositions, all attributes) against FD-cls / floor, each point labelled
    with its guidance scale."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ratios = [e.metrics["fd_cls_ratio"] for e in evaluations]
    for key in SWEEP_ALIGNMENT:
        points = [(r, e.metrics[key], e.settings.guidance_scale) for r, e in zip(ratios, evaluations)
                  if key in e.metrics]
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=key.removeprefix("align_").replace("_all", "").replace("_", "-") + " compositions")
        for x, y, w in points:
            ax.annotate(f"w={w:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("FD-cls / floor (fidelity: lower is better)")
    ax.set_ylabel("alignment, all attributes")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Alignment against fidelity by guidance scale ({evaluations[0].settings.row})")
    ax.legend()
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
