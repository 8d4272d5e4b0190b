"""Pure-torch influence estimators, model architectures and training.

Importing this package fills :data:`REGISTRY` with the built-in estimators.
No web, database or broker imports live here (see pyproject's import-linter
contract), so the library is usable from a notebook.
"""

from . import methods, valuation
from .architectures import (
    ARCHITECTURES,
    Architecture,
    get_architecture,
    init_model,
    load_entry_point_architectures,
    make_params,
    register_architecture,
)
from .base import (
    ORIENTATION,
    REGISTRY,
    SIGN_CONVENTION,
    Attribution,
    Cancelled,
    Checkpoint,
    Estimator,
    EstimatorError,
    InfluenceProblem,
    NumericalError,
    ProblemSize,
    ProgressCallback,
    Runtime,
    TaskSpec,
    TrainState,
    get_estimator,
    register,
)
from .gradients import flatten, n_parameters, objective_hessian, per_sample_gradients, trainable_names
from .objectives import margin, per_example_loss, query_objective
from .training import Recipe, TrainResult, checkpoint_epochs, learning_rate_at, train

__all__ = [
    "ARCHITECTURES",
    "ORIENTATION",
    "REGISTRY",
    "SIGN_CONVENTION",
    "Architecture",
    "Attribution",
    "Cancelled",
    "Checkpoint",
    "Estimator",
    "EstimatorError",
    "InfluenceProblem",
    "NumericalError",
    "ProblemSize",
    "ProgressCallback",
    "TrainState",
    "Recipe",
    "Runtime",
    "TaskSpec",
    "TrainResult",
    "checkpoint_epochs",
    "flatten",
    "get_architecture",
    "get_estimator",
    "init_model",
    "learning_rate_at",
    "load_entry_point_architectures",
    "make_params",
    "margin",
    "methods",
    "valuation",
    "n_parameters",
    "objective_hessian",
    "per_example_loss",
    "per_sample_gradients",
    "query_objective",
    "register",
    "register_architecture",
    "train",
    "trainable_names",
]
