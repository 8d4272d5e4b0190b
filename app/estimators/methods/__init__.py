"""Estimator implementations; importing this package registers every module's estimators.

Each module registers its classes with ``@register``; new modules are picked up
automatically, so adding a method is adding a file.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
