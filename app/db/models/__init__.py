"""ORM tables; importing this package registers them all on ``Base.metadata``."""

from app.db.models.dataset import Dataset
from app.db.models.job import ACTIVE_STATES, TERMINAL_STATES, Job
from app.db.models.model import Checkpoint, Model
from app.db.models.result import InfluenceResult, QueryResult
from app.db.models.shard import JobShard, TrainStateEntry
from app.db.models.tenant import ApiKey, Tenant

__all__ = [
    "ACTIVE_STATES",
    "ApiKey",
    "Checkpoint",
    "Dataset",
    "InfluenceResult",
    "Job",
    "JobShard",
    "Model",
    "QueryResult",
    "Tenant",
    "TERMINAL_STATES",
    "TrainStateEntry",
]
