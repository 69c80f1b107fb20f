"""Training: the ONLY place that imports deepspeed / torch.distributed (engine, loop, checkpoints, logging)."""
