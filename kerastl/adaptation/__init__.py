"""Domain adaptation: one concept per module.

The source domain has labels, the target domain has none (or a few), and the
model must do well on the target.

* :mod:`~kerastl.adaptation.reversal` — :class:`GradientReversal`.
* :mod:`~kerastl.adaptation.schedules` — :class:`GaninLambda`,
  :class:`GaninLearningRate` (per-batch callbacks).
* :mod:`~kerastl.adaptation.losses` — :func:`coral_loss`,
  :func:`mmd_loss`, :func:`confusion_loss`, :func:`information_loss`,
  :func:`mcc_loss`.
* :mod:`~kerastl.adaptation.dann` — :class:`DANN`, trained with plain
  ``fit``; its block map lists the feature extractor's blocks, then
  ``bottleneck``, ``label_head`` and ``domain_head``.
* :mod:`~kerastl.adaptation.adda` — :class:`ADDA` (stage 2 of ADDA in
  ``fit``).
* :mod:`~kerastl.adaptation.adamatch` — :class:`AdaMatch` (self-training
  with weak and strong views, trained with plain ``fit``),
  :func:`adamatch_loss`.
* :mod:`~kerastl.adaptation.recipe` — :func:`adapt`, the default recipe
  in one call (AdaMatch, then AdaBN).
* :mod:`~kerastl.adaptation.scale` — :func:`scale_shift`, the label-free
  check of a change of scale that sets :func:`adapt`'s ``zoom``.
* :mod:`~kerastl.adaptation.selection` — label-free model selection:
  :func:`deep_embedded_validation`, :func:`ensemble_validation`,
  :func:`average_thresholded_confidence`, :func:`mix_validation`,
  :func:`select_model`.
* :mod:`~kerastl.adaptation.data` — :func:`domain_dataset`.
* :mod:`~kerastl.adaptation.adabn` — :func:`adapt_batch_norm` (AdaBN),
  :func:`tent` (test-time entropy minimisation), :func:`mean_entropy`.
* :mod:`~kerastl.adaptation.borrowing` — borrowing similar source data:
  :func:`select_source_samples`, :func:`hard_examples`,
  :func:`joint_fine_tune`.
"""

from kerastl.adaptation.adabn import adapt_batch_norm, mean_entropy, tent
from kerastl.adaptation.adamatch import (AdaMatch, adamatch_loss,
                                         strong_augmentation,
                                         weak_augmentation)
from kerastl.adaptation.adda import ADDA
from kerastl.adaptation.borrowing import (JointFineTuning, SourceSelection,
                                          hard_examples, joint_fine_tune,
                                          select_source_samples)
from kerastl.adaptation.dann import DANN
from kerastl.adaptation.data import domain_dataset
from kerastl.adaptation.losses import (confusion_loss, coral_loss,
                                       information_loss, mcc_loss, mmd_loss)
from kerastl.adaptation.recipe import adapt
from kerastl.adaptation.reversal import GradientReversal
from kerastl.adaptation.scale import ScaleShift, scale_shift
from kerastl.adaptation.selection import (ATCEstimate, DEVEstimate,
                                          EnsembleEstimate,
                                          MixValEstimate, ModelSelection,
                                          average_thresholded_confidence,
                                          deep_embedded_validation,
                                          ensemble_validation,
                                          mix_validation, select_model)
from kerastl.adaptation.schedules import (GaninLambda, GaninLearningRate,
                                          ganin_lambda)

__all__ = ["ADDA", "ATCEstimate", "AdaMatch", "DANN", "DEVEstimate", "EnsembleEstimate", "GaninLambda",
           "GaninLearningRate", "GradientReversal", "JointFineTuning",
           "MixValEstimate", "ModelSelection", "ScaleShift", "SourceSelection", "adamatch_loss", "adapt", "adapt_batch_norm",
           "average_thresholded_confidence",
           "confusion_loss", "coral_loss", "deep_embedded_validation",
           "ensemble_validation",
           "domain_dataset", "ganin_lambda", "hard_examples",
           "information_loss", "joint_fine_tune", "mcc_loss", "mean_entropy",
           "mix_validation", "mmd_loss", "scale_shift", "select_model", "select_source_samples", "strong_augmentation", "tent",
           "weak_augmentation"]
