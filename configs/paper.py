"""The paper's six combinations as one study.

PAPILA-sex, PAPILA-age, HAM10000-sex, HAM10000-age, CheXpert-sex and
CheXpert-race, each with its dataset's config (`configs/<dataset>.py`); the
study's `seeds`, `bias.rates`, `model.init_from` and `dataset.data_dir` apply
to every combination.

  python -m ncjax.main --config=configs/paper.py \\
    --config.model.init_from=resnet18.npz --workdir=runs/paper

Expected time: the sum of the three dataset configs' estimates (dominated by
CheXpert, days on one GPU); on a cluster run the combinations as separate
jobs and point the report at their workdirs.
"""

from __future__ import annotations

import ml_collections

from configs import papila


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = papila.get_config()
  config.study.combos = (
      "papila:sex",
      "papila:age",
      "ham10000:sex",
      "ham10000:age",
      "chexpert:sex",
      "chexpert:race",
  )
  return config
