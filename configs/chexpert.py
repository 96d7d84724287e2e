"""CheXpert (chest X-ray, any finding): CheXpert-sex and CheXpert-race.

SPEC section 4 settings on 224 x 224 grayscale images: ResNet-18 from
ImageNet weights (the first convolution summed over RGB), Adam 2e-4, batch
256, 200 epochs, patience 5, 10 seeds, clean and 25% under-diagnosis.
Prepare once (`python -m ncjax.prepare --dataset=chexpert --manual_dir=DIR`),
then:

  python -m ncjax.main --config=configs/chexpert.py:attribute=race \\
    --config.model.init_from=resnet18.npz --workdir=runs/chexpert-race

Arguments: `attribute=sex|race|age`; `study` runs sex and race. Expected
time: 76,205 training images x 200 epochs x 20 members is about 300M
ResNet-18 image-steps; estimated, not measured, at 2-4 days on one
H100/H200-class GPU: spread the seeds over machines (launch/).
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = base.parse_arg(arg, attribute="sex", study=False)
  config = base.base_config()
  config.dataset.name = "chexpert"
  config.dataset.attribute = arg.attribute
  # Grayscale: ImageNet statistics averaged over channels.
  config.dataset.mean = (0.449,)
  config.dataset.std = (0.226,)
  if arg.study:
    config.study.combos = ("sex", "race")
  config.lock()
  return config
