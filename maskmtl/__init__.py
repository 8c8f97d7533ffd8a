"""maskmtl: per-task (or per-group) binary masks over one shared network, learned during training.

Extension points (``maskmtl.interfaces``): Scorer, Scheduler, Initializer, Grouper.

Layout, in the order of the lifecycle init -> masked step -> score -> swap -> save/export:

init
    ``targets``       which parameters carry masks (``select_targets``) and the target report
    ``initializers``  per-target densities (dense, random, ERK) and masks with exact counts per group
    ``masks``         ``MaskSet``, the masks as state (tasks, task -> group map); masks.safetensors
masked step
    ``apply``         ``MaskedModel`` (the forward sees θ⊙M) and ``MaskedAdamW`` (the step gated by M)
score
    ``gradients``     per-task masked and recovery gradients (``estimate_gradients``), ``harmony``
    ``scorers``       drop and recovery scores: agreement, magnitude, Fisher, random
swap
    ``schedulers``    α_t, the entries each group swaps at step t
    ``selection``     ``swap`` and ``masks_from_scores``: pure functions of masks and scores
    ``update``        ``MaskUpdater`` (gradients -> scores -> α_t -> swap -> optimizer state),
                      ``check_schedule``, G-HarmoDT's ``group_tasks``, ``swap_diagnostics``
save / export
    ``checkpoint``    resumable training checkpoints (model, masks, optimizer, step, RNG states)
    ``outputs``       a run folder's results.json and metrics.jsonl
    ``export``        a task's (group's, voting) structured mask as a smaller dense model
alongside
    ``interfaces``    the Protocols of the four extension points
    ``config``        builds the plug-ins from config (``build``, ``Masking``) and checks its values
    ``structures``    structured masks (units, attention heads): ``StructureMap``, the structure
                      twins of initialisation, score aggregation and the swap
    ``groupers``      clustering tasks into mask groups (G-HarmoDT, used by ``group_tasks``)
    ``surgery``       gradient surgery (PCGrad, CAGrad) for the dense MTDT baselines; no masks

``selection`` imports no other module of the package; ``structures`` imports ``selection``;
``update`` imports both.
"""

from .apply import MaskedAdamW, MaskedModel
from .checkpoint import load_checkpoint, save_checkpoint
from .export import ExportError, export_pruned, load_export, save_export
from .gradients import GroupGradients, estimate_gradients, harmony
from .groupers import KNNGrouper, NoneGrouper
from .initializers import DenseInitializer, ERKInitializer, RandomInitializer
from .interfaces import Grouper, Initializer, Scheduler, Scorer, StepAwareScorer, TermScorer
from .masks import (MaskError, MaskIndexError, MaskSet, MaskTargetError, load_masks, read_masks_file,
                    remove_stale_temps, save_masks)
from .schedulers import ConstantScheduler, CosineScheduler
from .scorers import AgreementScorer, FisherScorer, MagnitudeScorer, RandomScorer
from .structures import AttentionHeads, StructureError, StructureMap, build_structures
from .targets import Target, TargetError, select_targets
from .update import (MaskUpdateError, MaskUpdater, check_schedule, group_tasks, masks_from_scores, swap,
                     swap_diagnostics)

__all__ = [
    "AgreementScorer", "AttentionHeads", "ExportError", "StructureError", "StructureMap", "build_structures",
    "export_pruned", "load_export", "save_export", "ConstantScheduler", "CosineScheduler", "DenseInitializer", "ERKInitializer",
    "FisherScorer", "GroupGradients", "Grouper", "Initializer", "KNNGrouper", "MagnitudeScorer",
    "MaskError", "MaskIndexError", "MaskSet", "MaskTargetError", "MaskUpdateError", "MaskUpdater", "MaskedAdamW", "MaskedModel",
    "NoneGrouper", "RandomInitializer", "RandomScorer", "Scheduler", "Scorer", "StepAwareScorer", "Target",
    "TargetError", "TermScorer",
    "check_schedule", "estimate_gradients", "group_tasks", "harmony", "load_checkpoint", "load_masks",
    "masks_from_scores", "read_masks_file", "remove_stale_temps", "save_checkpoint", "save_masks", "select_targets", "swap",
    "swap_diagnostics",
]
__version__ = "0.1.0"
