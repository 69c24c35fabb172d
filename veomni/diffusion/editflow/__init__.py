"""Edit Flows (insert / delete / substitute) on our backbones: docs/models.md, "EditFlow".

align.py (Needleman-Wunsch), flow.py (kappa, z_t, edits), objective.py (the training loss),
sampler.py (tau-leaping), args.py (train.editflow.* and infer.editflow.*). Kept import-light."""
