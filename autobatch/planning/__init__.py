"""Planning: which samples each rank processes, in which micro-batches. Pure values.

    planner      make_plan, the one entry point (any sharding, or "auto")
    plan         RankPlan, Plan (the plan as data)
    capacity     DeviceCapacity: what a device can do for a job
    memory       PeakLine, ModelState, MemoryModel: a rank's peak memory, one term per
                 memory lever (SHARDING_TERMS: by sharding mode and world size)
    solver       the replica solver: the fastest split when ranks run their own number of
                 micro-steps (plan_replicas, equal_split_plan)
    equal_steps  the fastest split when every rank runs the same number of micro-steps
    sharded      plans for a sharded model at the world size they include;
                 choose_sharding ("auto")
    rebalance    the plan made again from the ranks' measured compute (propose)
    sampler      GlobalBatchSampler: the same global batches on any device mix
    packing      length-aware micro-batches for variable-length sequences

Imports point one way: rebalance -> planner -> sharded -> solver, equal_steps -> plan ->
capacity -> memory.

May import: autobatch.errors, autobatch.levers; never: torch, ray, launcher.
"""
