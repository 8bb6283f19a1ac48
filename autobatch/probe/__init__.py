"""Probing: what a device can do for a job, measured on it or estimated without it.

    devices        inventory (NVML, torch, simulated devices), device lists and sizes
    measure        one real training step on one device (the step's own code), measured
    profile        profile_model: peak memory and time per micro-batch, fitted, verified
    time_fit       the time line per micro-step, fitted robustly, and whether to trust it
    model_profile  ModelProfile, the profile as a value; -> DeviceCapacity
    budget         usable memory less headroom and what a probe cannot see (reserve)
    model_state    parameters, gradients, optimizer state, sharding units, in bytes
    peak           peak(b) as the max of lines;  cache   profiles on disk
    group          plan_for_group: every rank of a DDP script profiles, one plan
    estimate       the same figures for GPUs you do not have, per GPU (a roofline)
    trace          the training step on fake tensors: memory, ops, state; by depth
    gpus           the GPUs an estimate knows (vendor peak figures)
    lm_depth       a causal LM traced at 1 and 2 layers, its figures scaled to its depth
    whatif         every precision x LoRA x checkpointing x sharding combination, estimated
    outcomes       the what-if's values: Levers, LMJob, Outcome, WhatIf and its table
    simulated      simulated devices: enforced memory and paced speed on a CPU

May import: autobatch.errors, autobatch.levers, autobatch.planning, autobatch.step,
autobatch.tasks (the task contract, and the causal LM's model that estimates trace);
never: ray, launcher.
"""
