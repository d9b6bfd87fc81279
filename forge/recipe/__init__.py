"""Recipes: a graph of stage steps in one Hydra config (conf/recipe/), run with one command.
Each step's output is addressed by a fingerprint of its settings and inputs, so a re-run runs only
what changed and a setting switched back reuses the earlier output (forge/recipe/fingerprint.py)."""
