"""DeepInversion (Yin et al. 2020), with the defaults of the authors' ImageNet script (NVlabs/DeepInversion).

L = CE + r_feature * sum_l s_l (||mu_b - mu_run||_2 + ||var_b - var_run||_2) + tv_l2 * TV_l2 + l2 * L2, with
s_0 = 10 (``first_bn_multiplier``), r_feature = 0.01 (the README/logs value; the argparse default is 0.05),
TV-L2 1e-4, L2 1e-5, Adam(lr 0.25, betas (0.5, 0.9)), 100 warm-up iterations then cosine, jitter 30 px at 224 px
(scaled with resolution), random flips, clipping to the valid range after each step, 2000 iterations (the
authors' ``setting_id=1``; ``--multires-iterations N`` adds their low-resolution first stage, ``setting_id=0``).

Deliberate differences from the public code: the best image is kept per sample and cloned (the CIFAR script keeps
an alias of the live tensor; the ImageNet script tracks per batch and stores the post-step iterate), and images
are stored as float16 tensors plus lossless PNG previews (the code writes truncated 8-bit JPEGs).
"""

from ..bn import deepinversion_feature_loss
from .base import Method

DEFAULTS = {
    "bn_weight": 0.01,
    "first_bn_multiplier": 10.0,
    "ce_weight": 1.0,
    "tv_l1": 0.0,
    "tv_l2": 1e-4,
    "l2": 1e-5,
    "flip": True,
}

METHOD = Method(
    name="deepinversion",
    summary="CE + DeepInversion BN feature loss (L2 of mean/var gaps) + TV/L2 priors (Yin et al. 2020)",
    defaults=DEFAULTS,
    bn_loss=deepinversion_feature_loss,
)
