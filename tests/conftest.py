"""Test setup. The fake Hub must be running and HF_ENDPOINT set before huggingface_hub is
imported anywhere, because the client reads its endpoint at import time."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hubserver import FakeHub  # noqa: E402

_HUB = FakeHub()
_HUB.start()
_HOME = tempfile.mkdtemp(prefix="clt-hub-test-hf-")
os.environ.update({
    "HF_ENDPOINT": _HUB.endpoint,
    "HF_HOME": _HOME,
    "HF_TOKEN": "hf_local_test_token",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_ETAG_TIMEOUT": "5",
})
os.environ.pop("HF_HUB_OFFLINE", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hub() -> FakeHub:
    return _HUB


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one torch thread is many times faster than two on a shared machine (and deterministic)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

