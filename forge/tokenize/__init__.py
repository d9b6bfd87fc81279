"""forge pipeline=tokenize: token shards a trainer reads (see forge/tokenize/stage.py)."""
