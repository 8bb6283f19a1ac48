"""The optimizer step: micro-steps under no_sync, one synced, the loss weight, clip, step.

    accumulate  Accumulator: the step (and its micro_step and update, which the probe
                measures and the estimate traces)
    wrap        how the model is wrapped for data parallelism (Replicated: DDP)
    precision   fp32 / bf16 / fp16, autocast, and the choice for a mix of devices

Imports torch and autobatch.errors only; never Ray or the launcher.
"""
