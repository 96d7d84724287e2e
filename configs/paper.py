"""The paper's six combinations as one study, or as a sweep of 60 runs.

PAPILA-sex, PAPILA-age, HAM10000-sex, HAM10000-age, CheXpert-sex and
CheXpert-race, each with its dataset's config (`configs/<dataset>.py`); the
study's `seeds`, `bias.rates`, `model.init_from` and `dataset.data_dir` apply
to every combination. On one machine, as one study:

  python -m ncjax.main --config=configs/paper.py \\
    --config.model.init_from=resnet18.npz --workdir=runs/paper

On a cluster, `get_sweep()` splits it into one run per combination and seed
(6 x 10 studies of one combination, each a clean and a biased member plus
that seed's separability model), which `launch/` spreads over machines:

  python -m launch.slurm --config=configs/paper.py --workdir_root=runs/paper \\
    --config.model.init_from=$PWD/resnet18.npz

Expected time: the sum of the three dataset configs' estimates (dominated by
CheXpert, days on one GPU); a point of the sweep takes about a tenth of its
combination's estimate.
"""

from __future__ import annotations

import ml_collections

from configs import papila

COMBOS = (
    "papila:sex",
    "papila:age",
    "ham10000:sex",
    "ham10000:age",
    "chexpert:sex",
    "chexpert:race",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = papila.get_config()
  config.study.combos = COMBOS
  return config


def get_sweep(arg: str | None = None) -> list[dict[str, tuple]]:
  """One run per (combination, seed), combinations outermost."""
  seeds = get_config(arg).seeds
  return [{"study.combos": (combo,), "seeds": (seed,)} for combo in COMBOS for seed in seeds]
