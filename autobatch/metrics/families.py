"""The metric families autobatch exposes: the names of docs/metrics.md, one table.

Each gauge and counter is (exposed name, `RankSnapshot` field, HELP); counters are
named without "_total", which prometheus_client appends (`METRIC_NAMES` has the
names as scraped). The per-rank families are labelled `snapshot.LABELS`; WORLD,
RESIZES and REBALANCES are per job (label `job_id` only, from the job's rank 0); JOBS counts the
jobs known to the collector's owner by state. `autobatch.metrics.prometheus`
exposes them.
"""

from __future__ import annotations

GAUGES = (
    (
        "autobatch_device_memory_total_bytes",
        "device_memory_total_bytes",
        "Total memory of the device, from NVML.",
    ),
    (
        "autobatch_device_memory_used_bytes",
        "device_memory_used_bytes",
        "Used memory of the device (all processes), from NVML.",
    ),
    (
        "autobatch_torch_memory_allocated_bytes",
        "torch_memory_allocated_bytes",
        "Memory allocated by torch tensors on this rank at the end of the last step.",
    ),
    (
        "autobatch_torch_memory_reserved_bytes",
        "torch_memory_reserved_bytes",
        "Memory reserved by the torch caching allocator on this rank at the end of the last step.",
    ),
    (
        "autobatch_torch_memory_peak_bytes",
        "torch_memory_peak_bytes",
        "Peak memory allocated by torch on this rank during the last step.",
    ),
    (
        "autobatch_plan_predicted_peak_bytes",
        "plan_predicted_peak_bytes",
        "Peak memory the plan predicted for this rank's micro-batch.",
    ),
    (
        "autobatch_micro_batch_size",
        "micro_batch_size",
        "Largest micro-batch of this rank in the last optimizer step, in samples.",
    ),
    (
        "autobatch_accumulation_steps",
        "accumulation_steps",
        "Micro-steps of this rank in the last optimizer step.",
    ),
    (
        "autobatch_rank_samples_per_step",
        "rank_samples_per_step",
        "Samples this rank processed in the last optimizer step.",
    ),
    (
        "autobatch_global_batch_size",
        "global_batch_size",
        "Configured global batch size, in samples per optimizer step.",
    ),
    (
        "autobatch_effective_global_batch_size",
        "effective_global_batch_size",
        "Global batch measured over all ranks in the last optimizer step, in samples.",
    ),
    (
        "autobatch_sync_wait_seconds",
        "sync_wait_s",
        "Time this rank spent in the synchronised backward of the last step.",
    ),
    (
        "autobatch_rank_compute_seconds",
        "rank_compute_s",
        "Compute of this rank's micro-steps in the last step (forward and backward, not the "
        "wait at the all-reduce), measured.",
    ),
    (
        "autobatch_plan_predicted_compute_seconds",
        "plan_predicted_compute_s",
        "Compute the plan predicted for this rank's micro-batches of the last step.",
    ),
    (
        "autobatch_plan_efficiency_ratio",
        "plan_efficiency_ratio",
        "Predicted throughput of the plan over the ideal (each device alone at its best).",
    ),
    ("autobatch_train_loss", "train_loss", "Training loss of the last optimizer step."),
    (
        "autobatch_checkpoint_stall_seconds",
        "checkpoint_stall_s",
        "Time the training loop of this rank was blocked by its last checkpoint save (the "
        "previous write finishing, the copy to host memory; the whole write when synchronous).",
    ),
    (
        "autobatch_checkpoint_write_seconds",
        "checkpoint_write_s",
        "Time this rank's last completed checkpoint write took, from the copy to host memory "
        "to complete (in the background when checkpoint.async).",
    ),
    (
        "autobatch_padding_waste_ratio",
        "padding_waste_ratio",
        "Padded tokens over all tokens of this rank's micro-batches in the last step.",
    ),
)
COUNTERS = (
    ("autobatch_samples_processed", "samples_processed_total", "Samples processed by this rank."),
    ("autobatch_tokens_processed", "tokens_processed_total", "Tokens processed by this rank."),
    ("autobatch_optimizer_steps", "optimizer_steps_total", "Optimizer steps taken by this rank."),
    ("autobatch_oom_events", "oom_events_total", "Out-of-memory errors caught on this rank."),
    (
        "autobatch_worker_restarts",
        "worker_restarts_total",
        "Restarts of the training worker of this rank.",
    ),
)
REPLANS = ("autobatch_replans", "Re-plans of the job seen by this rank, by reason.")
# Per job, from its rank 0 (label job_id only).
WORLD = (
    "autobatch_job_world_size",
    "Ranks the job trains on, as its rank 0 measured in its last step.",
)
RESIZES = (
    "autobatch_resizes",
    "Resizes of the job (its device set changed during the run), by reason.",
)
REBALANCES = (
    "autobatch_rebalances",
    "Rebalances of the job: switches to a new split of the global batch from measured compute.",
)
STEP = ("autobatch_step_duration_seconds", "Duration of an optimizer step on this rank.")
JOBS = ("autobatch_jobs", "Jobs known to the owner of this collector, by state.")

METRIC_NAMES = tuple(
    [n for n, _, _ in GAUGES]
    + [n + "_total" for n, _, _ in COUNTERS]
    + [REPLANS[0] + "_total", WORLD[0], RESIZES[0] + "_total", REBALANCES[0] + "_total"]
    + [STEP[0], JOBS[0]]
)
