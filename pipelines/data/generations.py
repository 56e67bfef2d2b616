"""The generation rule that ``ddpm preprocess`` and ``ddpm encode`` commit by.

A run writes everything it makes under a new ``OUTPUT/data-<run>/`` (its scratch under ``OUTPUT/_tmp-<run>/``),
then switches to it by rewriting ``OUTPUT/manifest.json``, one atomic PUT (or rename); only then is the previous
generation unreferenced, and deleted. A run that dies midway leaves the previous output readable, plus leftovers
that no manifest names and the next successful run deletes. One run at a time per OUTPUT: a second concurrent
run's commit would delete the first run's generation.
"""

from __future__ import annotations

import uuid

from pipelines import storage
from pipelines.errors import UserError


def new_run() -> tuple[str, str]:
    """(generation folder, scratch folder) names of a new run, relative to OUTPUT."""
    run = uuid.uuid4().hex[:12]
    return f"data-{run}", f"_tmp-{run}"


def delete_quietly(uri: str, endpoint_url: str | None) -> None:
    """Best-effort cleanup on the way out of a failure: never hides the error that is being raised."""
    try:
        storage.delete_prefix(uri, endpoint_url)
    except UserError:
        pass


def delete_stale(output_uri: str, *, keep: str, endpoint_url: str | None, also: tuple[str, ...] = ()) -> None:
    """After a commit: delete every generation and scratch prefix but ``keep`` (older runs, crashed runs), and the
    top-level folders named in ``also`` that the new manifest no longer names.

    Best effort: the run has succeeded whatever happens here, and the next run tries again.
    """
    try:
        tops = {e.key.split("/", 1)[0] for e in storage.list_files(output_uri, endpoint_url) if "/" in e.key}
    except UserError:
        return
    for top in sorted(tops):
        if top != keep and (top.startswith(("data-", "_tmp-")) or top in also):
            delete_quietly(storage.join(output_uri, top), endpoint_url)
