"""Where tasks run (conf/cluster): `local` in this process (forge/run/runner.py), or `slurm` through
submitit (slurm.py submits, jobs.py runs on the nodes, state.py reads what became of them)."""
