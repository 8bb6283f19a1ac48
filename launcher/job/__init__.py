"""One job on a Ray cluster: spec -> reserve -> probe -> plan -> ranks -> train -> recover.

    spec        JobSpec, the user's job as validated once at the edge
    tasks       the task registry (built-in tasks, entrypoints)
    cluster     connect, reserve bundles, place actors, wait for them
    worker      the actor in each bundle: inventory, probe, rendezvous, train
    context     what a rank is sent and returns;  train  its training loop
    rankstats   a rank's metrics snapshots
    optim       optimizer and schedule from the spec;  checkpoint  atomic checkpoints
    collector   the actor the ranks push snapshots to
    policy      the failure policy: failures -> decision (pure)
    events      what the runner tells its listener
    runner      JobRunner: the phases, the attempts, clean-up

May import autobatch (the library) and Ray; never launcher.daemon.
"""
