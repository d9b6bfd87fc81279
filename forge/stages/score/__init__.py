"""forge pipeline=score: completion-only NLL and embeddings per row (see forge/stages/score/stage.py)."""
