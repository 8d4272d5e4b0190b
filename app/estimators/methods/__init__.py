"""Built-in estimators; importing this package registers them in ``base.REGISTRY``."""

from . import influence_exact, similarity, tracin

__all__ = ["influence_exact", "similarity", "tracin"]
