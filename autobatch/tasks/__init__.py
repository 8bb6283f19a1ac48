"""Tasks: what a job trains (model, data, collate, summed loss), and the built-in ones.

    task        Task, the contract a user's entrypoint returns
    tiny_gpt    the demo: a tiny GPT on a synthetic corpus
    causal_lm   Hugging Face causal-LM fine-tuning from a local directory (extra: hf)
    lora        LoRA settings, one schema;  losses   summed losses the tasks share
    loader      StepLoader, MicroBatchSampler: a rank's micro-batches through torch's
                DataLoader (workers, prefetch, pinned memory), exactly the sampler's
    example, lm_example   runnable examples (a torchrun script; a tiny model and data)

May import autobatch.step and autobatch.planning; never Ray or the launcher.
"""
