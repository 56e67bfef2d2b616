"""Generation at cluster scale: many images from one model, spread over Ray Data actors.

- :mod:`pipelines.generate.job`: what a job makes (sampler settings, labels, seeds cut into shards) and its checks.
- :mod:`pipelines.generate.model_source`: the model, resolved once on the driver, loaded by each actor.
- :mod:`pipelines.generate.sampler_actor`: the sampler actors, shard numbers -> images -> a sink; also what
  ``ddpm evaluate`` runs for large sample counts, with a sink of feature statistics.
- :mod:`pipelines.generate.shards`: the output a shard writes, its commit file, the manifest.
- :mod:`pipelines.generate.batch`: ``ddpm generate --output``: the resumable job from seeds to a committed output.
- :mod:`pipelines.generate.progress`: the progress line (images/s, time left) that every generation path prints.
"""
