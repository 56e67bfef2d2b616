"""The MLflow model registry, and the one way every consumer turns a model URI into a local folder.

One module per job:

- :mod:`.resolve`: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local path -> the folder to load
  (a run folder -> its latest checkpoint); nothing is unpickled.
- :mod:`.cache`: the download cache of registered versions, its name checks and its least-recently-used eviction.
- :mod:`.versions`: log a checkpoint, an autoencoder or a CLIP as a pyfunc model, register, promote, list.
- :mod:`.canary`: the reference images a Serve replica checks before it serves a version.

The ``ddpm models`` command is :mod:`pipelines.commands.models`. Serve imports this package (and only it from
``pipelines``), so it stays light: the standard library at module level, MLflow inside the functions that need it.
The names below are the package's API; ``deploy/`` uses ``resolve_model``, ``current_version``, ``check_canary``
and ``gate_summary``.
"""

from pipelines.registry.canary import (CANARY_MAX_SIDE, CANARY_NUM_SEEDS, CANARY_SETTINGS_TAG, CANARY_TAG,
                                       CANARY_TOLERANCE, CANARY_TOLERANCE_TAG, CanaryVerdict, canary_images,
                                       canary_reference, canary_score, canary_settings, canary_summary, check_canary,
                                       record_canary)
from pipelines.registry.resolve import (ResolvedModel, current_version, find_autoencoder, find_checkpoint,
                                        parse_model_uri, resolve_autoencoder, resolve_clip, resolve_model, resolve_prior,
                                        weights_hash)
from pipelines.registry.versions import (ALIASES, AUTOENCODER_ARTIFACT, CHECKPOINT_ARTIFACT, CLIP_ARTIFACT,
                                         PRIOR_ARTIFACT, find_version, gate_summary, list_models, log_autoencoder,
                                         log_clip, log_model, log_prior, promote, register, version_kind)
