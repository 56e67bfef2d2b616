"""Where an evaluation's numbers go: ``evaluation.json``, sample grids and report files in a folder, and an MLflow run
(metrics named ``<row>/<metric>``, the settings as tags, the files as artifacts)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.evaluate.quality import Evaluation
    from pipelines.evaluate.report import Report

GRID_IMAGES = 100  # images in a sample grid (10 x 10)


def write_outputs(out: Path, evaluations: list["Evaluation"], report: "Report | None" = None) -> list[Path]:
    """``evaluation.json`` (every number with its settings), ``samples_<row>.png`` grids, and the report files."""
    from ddpm import encode_png, make_grid

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "evaluation.json"]
    written[0].write_text(json.dumps([e.to_dict() for e in evaluations], indent=2, sort_keys=True))
    for e in evaluations:
        path = out / f"samples_{e.row}.png"
        path.write_bytes(encode_png(make_grid(e.images[:GRID_IMAGES], ncols=10)))
        written.append(path)
    if report is not None:
        (out / f"{report.name}.md").write_text(report.markdown)
        (out / f"{report.name}.png").write_bytes(report.plot_png)
        written += [out / f"{report.name}.md", out / f"{report.name}.png"]
    return written


def log_to_mlflow(evaluations: list["Evaluation"], files: list[Path], *, tracking_uri: str, run_id: str | None = None,
                  experiment: str = "evaluation", tags: dict[str, str] | None = None) -> str:
    """Log metrics (``<row>/<metric>``), settings tags and ``files`` (under ``evaluation/``); returns the run id.

    With ``run_id`` the numbers join that run (e.g. the training run); otherwise a new run in ``experiment`` is
    created and closed.
    """
    from mlflow.entities import Metric

    from pipelines import tracking

    client = tracking.client(tracking_uri)
    own_run = run_id is None
    if own_run:
        run_id = client.create_run(tracking.ensure_experiment(experiment, tracking_uri)).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(f"{e.row}/{k}", float(v), now, 0) for e in evaluations for k, v in e.metrics.items()]
    client.log_batch(run_id, metrics=metrics)
    first = evaluations[0]
    settings = {f"eval.{k}": str(v) for k, v in asdict(first.settings).items() if k not in ("sampler", "steps")}
    for key, value in {**settings, **{f"eval.{k}": str(v) for k, v in first.identity.items()},
                       "eval.rows": ",".join(e.row for e in evaluations), **(tags or {})}.items():
        client.set_tag(run_id, key, value)
    for path in files:
        client.log_artifact(run_id, str(path), "evaluation")
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    return run_id
