"""Training: ``ddpm train`` on Ray Train (DDP), tracked in MLflow, and ``ddpm train-local`` (one process, core only).

Who does what in ``ddpm train`` (its flags and main are ``pipelines/commands/train.py``, which calls driver.train)::

    stage        the one Ray Train machinery every trainer runs (run_stage): the dataset check, the run's latest
                 checkpoint (resume), the workers and whether the cluster holds them, the MLflow run, the
                 TorchTrainer (retries, storage outages, one-line failures), registration of the final model
    driver       ddpm train's Stage: fit the config to the dataset's manifest, launch its workers
    run          the MLflow run: open (or reopen the one the checkpoint names), register the final model, close
    worker       the loop each of the N workers runs (gloo on CPU, NCCL on GPU); rank 0 logs and checkpoints
    resources    N or MIN-MAX workers (elastic); whether the cluster can hold them, checked before anything starts
    rows         the dataset's row order, a function of images seen only; a worker's rows from the object store
    preemption   a SIGTERM to a worker: a checkpoint at the next step; the node's shutdown command
    ddp          collectives: the weighted gradient all-reduce, sums over ranks, RNG states, rank 0's values;
                 the gradient layout DDP's buckets take in place
    progress     rank 0's progress line, printed by the driver; training progress as Ray metrics
    checkpoints  the checkpoint folder (no pickle) and TrainingState, the latest whole one in storage, upload
    samples      sample grids from fixed seeds
    local        ``ddpm train-local``'s training (its flags: ``pipelines/commands/train_local.py``)

``ddpm train-autoencoder``, ``ddpm train-clip`` and ``ddpm train-prior`` (flags in
``pipelines/commands/train_autoencoder.py``, ``train_clip.py`` and ``train_prior.py``) run on the same machinery, and
share one worker loop::

    loop                  the worker loop of a one-model stage: rows, DDP steps, logging, evaluation, checkpoints,
                          exact resume; a stage adds a LoopTask (its model, loss, evaluation, checkpoint folder)
    loop_config           the train section those stages share
    held_out              the fixed held-out split (by sha256) they evaluate on
    autoencoder           its driver: check the data, hold out the PSNR images, run the stage, register
    autoencoder_worker    its LoopTask: reconstruction + KL, held-out PSNR, the measured scaling factor
    autoencoder_config    its YAML (model: an AutoencoderConfig preset; train: its settings)
    clip                  its driver: check the captions, hold out the retrieval images, learn the tokenizer
    clip_worker           its LoopTask: the contrastive loss over the global batch, held-out retrieval
    clip_config           its YAML (model: the CLIP's sizes; train: its settings)
    prior                 its driver: resolve and pin the CLIP, hold out the evaluation images, index the captions
    prior_worker          its LoopTask: the frozen CLIP's embeddings, L_simple on them, held-out cosine vs the
                          text-embedding baseline
    prior_config          its YAML (model: the prior's sizes and schedule; train: the CLIP and its settings)
"""
