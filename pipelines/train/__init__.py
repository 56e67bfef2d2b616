"""Training: ``ddpm train`` on Ray Train (DDP), tracked in MLflow, and ``ddpm train-local`` (one process, core only).

Who does what in ``ddpm train`` (its flags and main are ``pipelines/commands/train.py``, which calls driver.train)::

    driver       fit the config to the dataset's manifest, find the run's latest checkpoint (resume), start the
                 TorchTrainer, wait out storage outages that stop it, then finish the run
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

``ddpm train-autoencoder`` (latent diffusion's first stage; flags in ``pipelines/commands/train_autoencoder.py``)
runs on the same machinery::

    autoencoder           its driver: check the data, hold out the PSNR images, start the TorchTrainer, register
    autoencoder_worker    its loop: reconstruction + KL, held-out PSNR, the measured scaling factor, checkpoints
    autoencoder_config    its YAML (model: an AutoencoderConfig preset; train: its settings)
"""
