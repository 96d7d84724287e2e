"""PAPILA (fundus, glaucoma): the paper's PAPILA-sex and PAPILA-age runs.

SPEC section 4 settings (Jones et al.): ResNet-18 from ImageNet weights,
Adam 2e-4, batch 32, 200 epochs, early stopping patience 5, 10 seeds, clean
and 25% under-diagnosis of group 1. Prepare the data once
(`python -m ncjax.prepare --dataset=papila --manual_dir=DIR`), convert
torchvision's ImageNet ResNet-18 once
(`python -m ncjax.torchvision_weights --input=resnet18-f37072fd.pth
--output=resnet18.npz`), then:

  python -m ncjax.main --config=configs/papila.py:attribute=sex \\
    --config.model.init_from=resnet18.npz --workdir=runs/papila-sex

Arguments: `attribute=sex|age`; `study` runs both attributes (and their
separability models) as one study. Expected time: 288 training images x 200
epochs x 20 members is about 1.2M ResNet-18 image-steps at 224 px (~7 PFLOP
with evaluation); an estimate, not a measurement, is 10-20 minutes on one
H100/H200-class GPU in float32.
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = base.parse_arg(arg, attribute="sex", study=False)
  config = base.base_config()
  config.dataset.name = "papila"
  config.dataset.attribute = arg.attribute
  config.batch_size = 32
  config.eval_batch_size = 128
  if arg.study:
    config.study.combos = ("sex", "age")
  config.lock()
  return config
