"""Train stage: the trainer (:mod:`vertstudy.train.trainer`; knows nothing of Ray, and nothing
of whole-CT inference, which its caller passes in as the ``whole_ct`` validator because
inference is a later stage) and the metrics (:mod:`vertstudy.train.metrics`: crop-level during
training, whole-CT matching for evaluation)."""
