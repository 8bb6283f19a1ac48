"""Planning: which samples each rank processes, in which micro-batches. Pure values.

    plan      DeviceCapacity (what a device can do), RankPlan, Plan (the plan as data)
    planner   make_plan (the fastest exact split), equal_split_plan (today's DDP recipe)
    sampler   GlobalBatchSampler: the same global batches on any device mix
    packing   length-aware micro-batches for variable-length sequences

Imports numpy and autobatch.errors only (no torch, no Ray, never the launcher).
"""
