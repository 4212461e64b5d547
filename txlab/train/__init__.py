"""`txlab train` and `txlab generate`: the training loop (`loop`), checkpoints (`checkpoint`) and sampling
(`generate`)."""
