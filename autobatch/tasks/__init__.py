"""Tasks: what a job trains (model, data, collate, summed loss), and the built-in ones.

    task        Task, the contract a user's entrypoint returns
    tiny_gpt    the demo: a tiny GPT on a synthetic corpus
    causal_lm   Hugging Face causal-LM fine-tuning from a local directory (extra: hf)
    lm_data     its data: JSONL records, tokens, padded micro-batches, the summed loss
    hf_model    its model: the optional imports, the directory's checks, loading
    lora        LoRA settings, one schema;  losses   summed losses the tasks share
    loader      StepLoader, MicroBatchSampler: a rank's micro-batches through torch's
                DataLoader (workers, prefetch, pinned memory), exactly the sampler's
    example, lm_example   runnable examples (a torchrun script; a tiny model and data)

May import: autobatch.errors, autobatch.levers, autobatch.planning, autobatch.step,
autobatch.probe.group (the torchrun example plans with it); never: ray, launcher.
"""
