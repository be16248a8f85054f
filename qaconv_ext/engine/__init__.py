"""Training: configuration, the training loop with exact resume, and checkpoints."""
from .checkpoint import (
    CHECKPOINT_NAME,
    PUBLIC_CHECKPOINT_NAME,
    CheckpointError,
    capture_rng_state,
    find_checkpoint,
    infer_backbone,
    load_checkpoint,
    load_public_qaconv,
    load_trained,
    TrainedModel,
    restore_rng_state,
    save_checkpoint,
)
from .config import RECIPE_DEFAULTS, RECIPES, TrainConfig
from .resume import RUN_OPTIONS, ResumeConflict, settle_resume
from .trainer import (
    MAX_BAD_STEPS,
    Trainer,
    LossDropSchedule,
    TrainingDiverged,
    build_graph_sampler,
    build_model,
    build_optimizer,
    build_scheduler,
    build_train_loader,
    run_training,
    seed_everything,
)

__all__ = [
    "TrainConfig", "RECIPES", "RECIPE_DEFAULTS", "LossDropSchedule", "build_graph_sampler", "Trainer", "run_training", "build_model", "build_optimizer", "build_scheduler", "build_train_loader",
    "seed_everything", "CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "find_checkpoint",
    "capture_rng_state", "restore_rng_state", "load_public_qaconv", "load_trained", "CheckpointError",
    "TrainingDiverged", "MAX_BAD_STEPS",
    "PUBLIC_CHECKPOINT_NAME", "infer_backbone", "TrainedModel", "RUN_OPTIONS", "ResumeConflict", "settle_resume",
]
