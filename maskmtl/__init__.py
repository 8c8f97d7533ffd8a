"""maskmtl: per-task (or per-group) binary masks over one shared network, learned during training.

Extension points (``maskmtl.interfaces``): Scorer, Scheduler, Initializer, Grouper.
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
