"""Probing: what a device can do for a job, measured on it or estimated without it.

    devices    inventory (NVML, torch, simulated devices), device lists and sizes
    measure    one real training step on one device (the step's own code), measured
    profile    peak memory and time per micro-batch, fitted and verified; -> DeviceCapacity
    peak       peak(b) as the max of lines;  cache   profiles on disk
    estimate   the same figures for GPUs you do not have (a FakeTensor trace + GPU specs)
    lm_depth   a causal LM traced at 1 and 2 layers, its figures scaled to its depth
    whatif     every precision x LoRA x checkpointing x sharding combination, estimated
    simulated  simulated devices: enforced memory and paced speed on a CPU

May import autobatch.planning, autobatch.step and autobatch.tasks.task; never Ray
or the launcher.
"""
