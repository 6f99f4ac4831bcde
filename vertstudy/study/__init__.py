"""Study stage: study specs, search spaces, trials on Ray Tune and Optuna, results and W&B tracking."""
