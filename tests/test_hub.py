"""Hub downloads and uploads through huggingface_hub's real client against tests/hubserver.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import decode_rounding_bound, random_transcoder
from hubserver import FakeHub
from test_artifacts import assert_identical

from clt_hub import HubError, Transcoder
from clt_hub.artifacts.hub import resolve

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md


@contextlib.contextmanager
def network_down(hub: FakeHub) -> Iterator[None]:
    """Really close the port (connection refused), then bring the server back on it."""
    port = hub.port
    hub.stop()
    try:
        yield
    finally:
        hub.start(port)


def publish(hub: FakeHub, tmp_path: Path, repo: str, model: Transcoder, branch: str = "main") -> str:
    model.save_pretrained(tmp_path / repo.replace("/", "_") / branch)
    return hub.add_folder(repo, tmp_path / repo.replace("/", "_") / branch, branch=branch)


def test_download_and_load(hub: FakeHub, tmp_path: Path) -> None:
    model = random_transcoder("clt", skip=True)
    publish(hub, tmp_path, "org/clt-a", model)
    loaded = Transcoder.from_pretrained("org/clt-a", cache_dir=tmp_path / "cache")
    assert_identical(model, loaded)
    assert str(tmp_path / "cache") in str(resolve("org/clt-a", cache_dir=tmp_path / "cache"))


def test_revision_pinning(hub: FakeHub, tmp_path: Path) -> None:
    v1, v2, v3 = (random_transcoder("plt", seed=s) for s in (1, 2, 3))
    sha1 = publish(hub, tmp_path, "org/pinned", v1)
    publish(hub, tmp_path / "b", "org/pinned", v2)
    publish(hub, tmp_path / "c", "org/pinned", v3, branch="exp")
    cache = tmp_path / "cache"
    assert_identical(v1, Transcoder.from_pretrained("org/pinned", revision=sha1, cache_dir=cache))
    assert_identical(v2, Transcoder.from_pretrained("org/pinned", cache_dir=cache))
    assert_identical(v3, Transcoder.from_pretrained("org/pinned", revision="exp", cache_dir=cache))


def test_cache_then_offline(hub: FakeHub, tmp_path: Path) -> None:
    model = random_transcoder("clt")
    publish(hub, tmp_path, "org/offline", model)
    cache = tmp_path / "cache"
    Transcoder.from_pretrained("org/offline", cache_dir=cache)
    before = len([r for r in hub.requests if "/resolve/" in r[1] and "org/offline" in r[1]])
    Transcoder.from_pretrained("org/offline", cache_dir=cache)
    after = len([r for r in hub.requests if "/resolve/" in r[1] and "org/offline" in r[1]])
    assert after == before, "a cached artifact must not be downloaded again"
    n = len(hub.requests)
    assert_identical(model, Transcoder.from_pretrained("org/offline", cache_dir=cache, local_files_only=True))
    assert len(hub.requests) == n, "local_files_only must not touch the network"
    with network_down(hub):
        assert_identical(model, Transcoder.from_pretrained("org/offline", cache_dir=cache))
        with pytest.raises(HubError, match="not in the local cache.*cannot be reached"):
            Transcoder.from_pretrained("org/offline", cache_dir=tmp_path / "empty-cache")


def test_missing_repo_and_revision(hub: FakeHub, tmp_path: Path) -> None:
    publish(hub, tmp_path, "org/exists", random_transcoder("clt"))
    with pytest.raises(HubError, match="repo org/nope does not exist"):
        Transcoder.from_pretrained("org/nope", cache_dir=tmp_path / "c")
    with pytest.raises(HubError, match="revision 'v9' does not exist in org/exists"):
        Transcoder.from_pretrained("org/exists", revision="v9", cache_dir=tmp_path / "c")
    with pytest.raises(HubError, match="neither an existing folder"):
        Transcoder.from_pretrained("no-such-thing", cache_dir=tmp_path / "c")


def test_push_to_hub_round_trip(hub: FakeHub, tmp_path: Path) -> None:
    model = random_transcoder("clt", skip=True, model_name="gpt2", metrics={"nmse": 0.2})
    url = model.push_to_hub("me/pushed", commit_message="first upload")
    assert "me/pushed/commit/" in url
    assert hub.repos["me/pushed"].private is False
    assert_identical(model, Transcoder.from_pretrained("me/pushed", cache_dir=tmp_path / "c"))
    card = (resolve("me/pushed", cache_dir=tmp_path / "c") / "README.md").read_text()
    assert 'from_pretrained("me/pushed")' in card
    # a branch, a private repo, and the main branch left untouched
    other = random_transcoder("clt", skip=True, seed=9, model_name="gpt2")
    other.push_to_hub("me/pushed", revision="v2")
    assert_identical(other, Transcoder.from_pretrained("me/pushed", revision="v2", cache_dir=tmp_path / "c"))
    assert_identical(model, Transcoder.from_pretrained("me/pushed", revision="main", cache_dir=tmp_path / "c2"))
    random_transcoder("plt").push_to_hub("me/secret", private=True)
    assert hub.repos["me/secret"].private is True


def test_registry_names_resolve(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_transcoder("plt")
    sha = publish(hub, tmp_path, "org/registered", model)
    reg = tmp_path / "registry.yaml"
    reg.write_text(f"my-plt:\n  repo_id: org/registered\n  revision: {sha}\n  model: gpt2\n  kind: plt\n")
    monkeypatch.setenv("CLT_HUB_REGISTRY", str(reg))
    assert_identical(model, Transcoder.from_pretrained("my-plt", cache_dir=tmp_path / "c"))


def test_lazy_from_hub(hub: FakeHub, tmp_path: Path) -> None:
    model = random_transcoder("clt")
    publish(hub, tmp_path, "org/lazy", model)
    lazy = Transcoder.from_pretrained("org/lazy", lazy=True, cache_dir=tmp_path / "c")
    x = torch.randn(3, model.n_layers, model.d_model)
    acts = model.encode(x)
    assert torch.equal(lazy.encode(x), acts)  # both hold the encoders in memory: the same kernels on the same bits
    # the lazy model multiplies gathered decoder rows, the eager one whole matrices: the same sums in another
    # order, so they agree to the sums' rounding (tests/TOLERANCES.md), not bit for bit
    apart = (lazy.decode(acts) - model.decode(acts, dense=True)).abs()
    assert (apart <= decode_rounding_bound(model, acts)).all()
    model.SPARSE_DECODE_DENSITY = 1.1  # the eager model gathers rows too: the same operations, bit for bit
    assert torch.equal(lazy(x)[0], model(x)[0])
