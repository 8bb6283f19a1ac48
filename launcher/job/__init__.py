"""One job on a Ray cluster: spec -> reserve -> probe -> plan -> ranks -> train -> recover.

    spec        JobSpec, the user's job as validated once at the edge
    bounds      what a spec can never run (refused before anything is reserved), a plan's bounds
    tasks       the task registry (built-in tasks, entrypoints)
    cluster     connect, reserve bundles, place actors, wait for them
    worker      the actor in each bundle: inventory, probe, rendezvous, train
    context     what a rank is sent and returns;  train  its training loop
    audit       a rank's ledger of the dataset indices it processed, step by step
    rebalancing a rank's measured compute; the switch to a rebalanced plan between steps
    faults      the faults a spec injects into a rank (drills)
    rankstats   a rank's metrics snapshots
    optim       optimizer and schedule from the spec;  checkpoint  atomic checkpoints
    collector   the actor the ranks push snapshots to
    policy      the failure policy: failures -> decision (pure)
    events      what the runner tells its listener
    states      the controller's states as data (Reserving ... Resizing, Restarting, Failed)
    controller  JobController: the state machine, one place that enters a state
    placement   reservations (placement groups, bundles) and actors
    probing     inventory, precision, profiles per device type, the plan
    ranks       one attempt's ranks: start them, wait for them, group their failures
    resizes     an elastic job's resize requests and their announcement

May import: autobatch, launcher.errors; never: launcher.daemon.
"""
