"""Training: ``gmsa train`` (the resumable trainer, its data, the token-probe warm-up), torchrun/FSDP glue,
run state on disk, loss curves, shapes and memory of large backbones, and file transport to an accelerator."""
