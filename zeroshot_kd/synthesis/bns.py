"""BNS scheme (The Knowledge Within, Haroush et al. 2020): match every BN layer's input statistics.

Loss: per BN layer and channel, KL(N(mu_run, var_run) || N(mu_batch, var_batch)) on the BN input, summed over
channels and averaged over layers (:func:`zeroshot_kd.bn.bns_kl_loss`). ``--ce-weight`` adds the Inception term
(the paper's BNS+I). No official code was released; no jitter or image priors by default, since the paper's loss
is the statistics term alone.
"""

from ..bn import bns_kl_loss
from .base import Method

METHOD = Method(
    name="bns",
    summary="KL(N(running) || N(batch)) per BN channel (The Knowledge Within); --ce-weight adds BNS+I",
    defaults={"bn_weight": 1.0},
    bn_loss=bns_kl_loss,
)
