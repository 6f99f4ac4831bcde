"""Train stage: the trainer (knows nothing of Ray), whole-CT inference and the metrics."""
