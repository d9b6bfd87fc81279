"""forge pipeline=tokenize: token shards a trainer reads (see forge/stages/tokenize/stage.py)."""
