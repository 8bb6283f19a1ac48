"""The optimizer step: micro-steps under no_sync, one synced, the loss weight, clip, step.

    accumulate  Accumulator: the step (and its micro_step and update, which the probe
                measures and the estimate traces)
    wrap        how the model is wrapped for data parallelism (Replicated: DDP), and
                wrapping_for(sharding) to name one
    shard       Sharded: FSDP2, "optimizer" (ragged micro-step counts) or "full" sharding
    dcp         save_sharded / load_sharded: checkpoints that load on any number of ranks
    precision   fp32 / bf16 / fp16, autocast, and the choice for a mix of devices

Imports torch and autobatch.errors only; never Ray or the launcher.
"""
