"""vertstudy: hyperparameter and ablation studies of the residual multi-label vertebra
labeling network with integral regression (Qin et al.), on Ray Tune, Optuna and W&B.

Pipeline stages, data flowing one way (``tests/test_architecture.py`` keeps it so): shared basics
(``anatomy``, ``errors``, ``config``, ``progress``, ``atomic``, ``checkpoint``) -> ``data``
(formats -> io -> preprocess/cache -> crops) -> ``model`` -> ``losses`` -> ``train`` -> ``infer``
(tiling, votes, decoders, whole-case prediction, evaluation, ``predict``) -> ``study`` (trial
adapter, runner, tables; their contract is :mod:`vertstudy.study.schema`; and the local cluster)
-> ``report`` -> ``bench`` -> ``cli``.
"""

__version__ = "0.1.0"
