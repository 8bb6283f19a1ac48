"""The optimizer step: micro-steps under no_sync, one synced, the loss weight, clip, step.

    accumulate  Accumulator: the step (and its micro_step and update, which the probe
                measures and the estimate traces)
    wrap        ModelWrapping, the seam of the memory levers: how the model is wrapped,
                each micro-step synchronised, checkpoints saved and loaded, the whole
                model gathered; wrapping_for(sharding) to name one
    replicated  Replicated: a replica per rank (DDP); its checkpoint file (one torch file)
    shard       Sharded: FSDP2, "optimizer" (ragged micro-step counts) or "full" sharding
    proportional  Proportional: planned ranges of the state, gathered a block at a time;
                its checkpoint (a replica's file)
    proportional_layout   Slices, Layout: the units laid out flat, each rank's range
    proportional_module   ProportionalModule: the gathers, frees and gradient reduces
    dcp         save_sharded / load_sharded: checkpoints that load on any number of ranks
    collective  where a small collective's tensor lives (nccl: the GPU)
    atomic      atomic writes of a file or a directory (the wrappings' checkpoints)
    storage     a checkpoint location: a local path or an object store's URI (fsspec)
    background  saves written in a thread once the state is copied to host memory
    precision   fp32 / bf16 / fp16, autocast, and the choice for a mix of devices

May import: autobatch.errors, autobatch.levers; never: ray, launcher.
"""
