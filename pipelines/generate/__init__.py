"""Generation at cluster scale: many images from one model, spread over Ray Data actors.

- :mod:`pipelines.generate.batch`: seeds -> sampler actors -> shards (PNG files or Parquet rows) with a manifest,
  resumable; also the sampler-and-features job that ``ddpm evaluate`` runs for large sample counts.
- :mod:`pipelines.generate.progress`: the progress line (images/s, time left) that every generation path prints.
"""
