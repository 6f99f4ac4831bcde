"""vertstudy: hyperparameter and ablation studies of the residual multi-label vertebra
labeling network with integral regression (Qin et al.), on Ray Tune, Optuna and W&B.

Pipeline stages, data flowing one way (see ../shared/DESIGN.md):
``data`` (formats -> io -> preprocess/cache -> crops) -> model -> losses -> train -> study -> report.
"""

__version__ = "0.1.0"
