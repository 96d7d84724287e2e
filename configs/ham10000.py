"""HAM10000 (dermoscopy, melanoma + akiec): HAM10000-sex and HAM10000-age.

SPEC section 4 settings: ResNet-18 from ImageNet weights, Adam 2e-4, batch
256, 200 epochs, patience 5, 10 seeds, clean and 25% under-diagnosis.
Prepare once (`python -m ncjax.prepare --dataset=ham10000 --manual_dir=DIR`),
then:

  python -m ncjax.main --config=configs/ham10000.py:attribute=age \\
    --config.model.init_from=resnet18.npz --workdir=runs/ham10000-age

Arguments: `attribute=sex|age`; `study` runs both. Expected time: 7,967
training images x 200 epochs x 20 members is about 32M ResNet-18
image-steps (~180 PFLOP with evaluation); estimated, not measured, at 4-8
hours on one H100/H200-class GPU in float32 (bf16 with
`--config.model.dtype=bfloat16` roughly halves it).
"""

from __future__ import annotations

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = base.parse_arg(arg, attribute="sex", study=False)
  config = base.base_config()
  config.dataset.name = "ham10000"
  config.dataset.attribute = arg.attribute
  if arg.study:
    config.study.combos = ("sex", "age")
  config.lock()
  return config
