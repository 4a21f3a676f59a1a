"""The engine layer above the pipeline: engine-scoped context variables and request batching."""
