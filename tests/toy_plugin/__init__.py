"""A toy model family used by diffcore's own tests: a complete plugin in miniature.

``plugin.py`` holds only hook implementations (no torch); ``model.py`` a tiny but real DiT-like
network; ``configs.py`` its PipelineConfig / SamplingParams; ``pipelines.py`` a composition of the
core stages; ``checkpoint.py`` writes a tiny Diffusers-format folder by hand.
"""
