"""Dataset similarity from a frozen teacher's BatchNorm statistics (The Knowledge Within, Haroush et al. 2020).

A trained teacher's BatchNorm layers hold the per-channel mean and variance of its training data at every
layer. Streaming another dataset through the same (frozen) teacher and measuring the same statistics gives a
**signature**: one Gaussian per channel per BN layer. Comparing signatures measures how close datasets are to
the unseen training data, and to each other, without touching the training data.

Statistics (conventions of :mod:`zeroshot_kd.bn`):

* taken at the **input** of every BatchNorm layer that tracks running statistics, per channel, pooled over
  images and spatial positions;
* ``exact`` mode (default): the mean and the biased variance over the *whole* dataset, accumulated in float64
  with Chan et al.'s parallel merge of (count, mean, M2), so the result does not depend on the batch size;
* ``per-batch`` mode: the average over batches of each batch's mean and biased variance, i.e. what the BNS
  loss sees during synthesis. Every full batch has the same weight; a last, partial batch is dropped when
  there is at least one full batch. The average batch variance is smaller than the dataset variance by the
  spread of the batch means, so the two modes are not interchangeable;
* the teacher's ``running_var`` was accumulated with the *unbiased* estimator; it is used as stored (the
  factor N/(N-1) is negligible at N*H*W in the thousands), and every variance gets the layer's ``eps`` added
  before a log or a division, as BatchNorm itself does.

Divergences of a dataset D from the teacher T, per layer (mean over the layer's channels), then averaged
over layers for the overall score:

============  ===========================================================================================
``bns``       **headline**: KL(N(mu_T, var_T) || N(mu_D, var_D)), the BNS form of The Knowledge Within
``reverse``   KL(N(mu_D, var_D) || N(mu_T, var_T))
``symmetric`` (bns + reverse) / 2
``l2``        DeepInversion's R_feature term: ||mu_D - mu_T||_2 + ||var_D - var_T||_2 over the layer's
              channels (first-layer multiplier 1, no eps)
============  ===========================================================================================

Dataset to dataset: the ``symmetric`` divergence between two signatures (mean over channels, then layers).

Signatures are saved as JSON or ``.pt`` together with the teacher's weights sha256
(:attr:`~zeroshot_kd.teachers.Teacher.weights_sha256`); loading them for another teacher is refused.

Layout of the package (one concern per module; every public name is re-exported here):

* :mod:`.signature`: the streaming accumulator, the :class:`Signature` type and its file format;
* :mod:`.divergence`: the teacher-to-data divergences and the dataset-to-dataset distance;
* :mod:`.shift`: pixel-space shifts of real data;
* :mod:`.stats`: rank correlations with confidence intervals;
* :mod:`.report`: the ranked report (JSON, Markdown, chart);
* :mod:`.predict`: score forms, the predicted calibration rank and the verdict (issue 14).
"""

from __future__ import annotations

from .divergence import DIVERGENCES, HEADLINE, dataset_distance, divergences, similarity_matrix
from .report import report_chart, report_markdown, similarity_report, write_report
from .shift import TRANSFORMS, TransformedDataset, make_similarity_dataset, parse_transforms
from .signature import (MODES, SIGNATURE_FORMAT, SIGNATURE_VERSION, MomentAccumulator, Signature, check_compatible,
                        compute_signature, load_signatures, save_signatures, teacher_signature)
from .predict import (PREDICTOR, SCORE_FORMS, VERDICT_CLOSE, VERDICT_FAR, VERDICTS, derive_verdict_thresholds,
                      predicted_ranks, score_forms, verdict)
from .stats import (bootstrap_interval, correlation, fisher_z_interval, kendall_tau_b, noise_ceiling, ranks,
                    reliability, spearman)

__all__ = [
    "DIVERGENCES",
    "HEADLINE",
    "MODES",
    "PREDICTOR",
    "SCORE_FORMS",
    "SIGNATURE_FORMAT",
    "SIGNATURE_VERSION",
    "TRANSFORMS",
    "VERDICTS",
    "VERDICT_CLOSE",
    "VERDICT_FAR",
    "MomentAccumulator",
    "Signature",
    "TransformedDataset",
    "bootstrap_interval",
    "check_compatible",
    "compute_signature",
    "correlation",
    "dataset_distance",
    "derive_verdict_thresholds",
    "divergences",
    "fisher_z_interval",
    "kendall_tau_b",
    "load_signatures",
    "make_similarity_dataset",
    "noise_ceiling",
    "parse_transforms",
    "predicted_ranks",
    "ranks",
    "reliability",
    "report_chart",
    "report_markdown",
    "save_signatures",
    "score_forms",
    "similarity_matrix",
    "similarity_report",
    "spearman",
    "teacher_signature",
    "verdict",
    "write_report",
]
