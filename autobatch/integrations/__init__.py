"""Integrations with trainers people already use; each imports its framework lazily.

    accelerate   AccelerateWrapping: the step's wrapping seam, as Hugging Face Accelerate
                 prepares the model (extra: accelerate)

May import: autobatch.errors, autobatch.levers, autobatch.step; never: ray, launcher.
"""
