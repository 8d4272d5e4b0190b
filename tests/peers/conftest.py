"""Peer-library cross-checks: marker registration, CPU limits, quiet progress bars.

Run with ``scripts/install-peers.sh && .venv/bin/pytest tests/peers -m peers``
(add ``-s`` to see the measured agreement figures each test prints).
"""

from __future__ import annotations

import os
from pathlib import Path

# before any peer library imports tqdm (dattri, kronfluence and pydvl draw progress bars)
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

_HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "peers: cross-check against the optional peer libraries (captum, traker, dattri, pyDVL, "
        "kronfluence, bergson); install them with scripts/install-peers.sh",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # every module also sets pytestmark; this catches a test added without it
    for item in items:
        if _HERE in Path(item.path).resolve().parents and item.get_closest_marker("peers") is None:
            item.add_marker(pytest.mark.peers)


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep every peer test on one intra-op thread (the machines running this are shared)."""
    torch.set_num_threads(1)
    yield
