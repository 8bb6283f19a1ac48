"""The optimizer step: micro-steps under no_sync, one synced, the loss weight, clip, step.

    accumulate  Accumulator: the step (and its micro_step and update, which the probe
                measures and the estimate traces)
    wrap        ModelWrapping, the seam of the memory levers: how the model is wrapped,
                each micro-step synchronised, checkpoints saved and loaded, the whole
                model gathered; Replicated (DDP), and wrapping_for(sharding) to name one
    shard       Sharded: FSDP2, "optimizer" (ragged micro-step counts) or "full" sharding
    dcp         save_sharded / load_sharded: checkpoints that load on any number of ranks
    atomic      atomic writes of a file or a directory (both wrappings' checkpoints)
    precision   fp32 / bf16 / fp16, autocast, and the choice for a mix of devices

May import: autobatch.errors, autobatch.levers; never: ray, launcher.
"""
