"""The machinery of one training stage; `microdit.train` is its command.

    runtime   processes and devices: rank, world, collectives, DDP/FSDP, bf16, stop signals
    state     what a checkpoint carries (EMA, optimizer, RNG) and which run `--out` holds
    setup     the stage built from its flags: model (fresh, from --init or resumed), optimizer, data
    loop      the training loop: steps, checkpoints, the end of the stage
    log       metrics, the sample grid, the summary
"""
