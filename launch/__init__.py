"""Launch scripts: a config's sweep run locally, on SLURM or on a TPU VM.

`sweep.py` turns a config file's `get_sweep()` into sweep points (override
flags and a workdir name each); `local.py`, `slurm.py` and `tpu.py` only
turn those points into processes, sbatch arrays or gcloud commands.
"""
