"""Training a plan: the stage/step loop, the trained model, data and evaluation, checkpoints,
torch.distributed (DDP, FSDP2) and the worker process (``python -m engine.train.worker``)."""
