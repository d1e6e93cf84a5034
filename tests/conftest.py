"""Test setup. The fake Hub must be running and HF_ENDPOINT set before huggingface_hub is
imported anywhere, because the client reads its endpoint at import time.

Every cache the tests fill lives in one temporary folder, removed when the run ends: clt_hub's own (the real
models converted from GGUF, 1.6 GB), the Hub client's, matplotlib's, Gradio's and Chromium's. Nothing is written
under the user's home. A developer who reruns the real-model tests often may keep the converted models between
runs by naming a folder in CLT_HUB_TEST_CACHE (it is then used and kept)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hubserver import FakeHub  # noqa: E402

_HUB = FakeHub()
_HUB.start()
_TMP = tempfile.mkdtemp(prefix="clt-hub-tests-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
os.environ.update({
    "CLT_HUB_CACHE": os.environ.get("CLT_HUB_TEST_CACHE") or os.path.join(_TMP, "clt_hub"),
    "MPLCONFIGDIR": os.path.join(_TMP, "matplotlib"),
    "GRADIO_TEMP_DIR": os.path.join(_TMP, "gradio"),
    # the browser tests' Chromium keeps its profile and caches under these (else ~/.config/chromium, ~/.cache)
    "XDG_CONFIG_HOME": os.path.join(_TMP, "config"),
    "XDG_CACHE_HOME": os.path.join(_TMP, "cache"),
    "HF_ENDPOINT": _HUB.endpoint,
    "HF_HOME": os.path.join(_TMP, "hf"),
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

