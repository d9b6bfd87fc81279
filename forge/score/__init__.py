"""forge pipeline=score: completion-only NLL and embeddings per row (see forge/score/stage.py)."""
