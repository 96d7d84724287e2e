"""The bias-rate ablation: clean and 12.5, 25, 37.5 and 50% under-diagnosis.

As in SS's ablation over the bias rate, the fraction of group-1 positives
relabelled negative (train and validation) varies; everything else is the
default study. Every rate is a member of the same run (members = seeds x
rates, sharing one compiled step and, per seed, one initialisation and data
order), so one study gives delta F1 against the rate: the report's
`fig_delta_f1_vs_rate.png` (per group, early and final stage, * where
Mann-Whitney p < 0.05) and `table_by_rate.csv` (Holm over combinations x
groups x rates). Figures 2 and 4 show the largest rate as "biased".

  python -m ncjax.main --config=configs/bias_sweep.py --workdir=runs/bias_sweep

runs the synthetic study of three attributes with five rates: 1,725
member-epochs against the default's 825, so about 25 minutes on 2 CPU cores
(estimated from the default's measured 11 minutes, not measured). On the
paper's datasets (`paper`: configs/paper.py, one run per combination and
seed, whose five members are the rates):

  python -m launch.slurm --config=configs/bias_sweep.py:paper \\
    --workdir_root=runs/bias_sweep_paper --config.model.init_from=$PWD/resnet18.npz

Arguments: `paper` as above; `tiny` shrinks the synthetic study (tests).
"""

from __future__ import annotations

import ml_collections

from configs import base, paper, synthetic

RATES = (0.0, 0.125, 0.25, 0.375, 0.5)


def _args(arg: str | None) -> ml_collections.ConfigDict:
  arg = base.parse_arg(arg, paper=False, tiny=False)
  if arg.paper and arg.tiny:
    raise ValueError("`tiny` shrinks the synthetic study; it does not combine with `paper`")
  return arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The synthetic (or, with `paper`, the paper's) study with five bias rates."""
  arg = _args(arg)
  config = paper.get_config() if arg.paper else synthetic.get_config("tiny" if arg.tiny else None)
  config.bias.rates = RATES
  return config


def get_sweep(arg: str | None = None) -> list[dict]:
  """`paper`: one run per combination and seed; synthetic: the one study."""
  if _args(arg).paper:
    return paper.get_sweep()
  return [{}]
