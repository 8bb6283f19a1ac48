"""Planning: which samples each rank processes, in which micro-batches. Pure values.

    plan      DeviceCapacity (what a device can do), RankPlan, Plan (the plan as data)
    planner   make_plan (the fastest exact split), equal_split_plan (today's DDP recipe)
    memory    Sharding ("none" | "optimizer" | "full"), ModelState, MemoryModel: a rank's
              peak memory by sharding mode and world size
    sharded   plans for a sharded model at the world size they include; full sharding's
              equal micro-step counts; choose_sharding ("auto")
    sampler   GlobalBatchSampler: the same global batches on any device mix
    packing   length-aware micro-batches for variable-length sequences

Imports numpy and autobatch.errors only (no torch, no Ray, never the launcher).
"""
