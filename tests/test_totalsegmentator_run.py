"""The ``totalsegmentator`` provider through the real TotalSegmentator v2 + nnU-Net v2 code.

``tests/test_segmentation.py`` checks the provider with a fake runner. Here nothing is faked
but the weights: :mod:`tests.totalseg_weights` writes a tiny nnU-Net result folder for the
``total --fast`` task (Dataset297) whose output is known, and the provider runs it through
:func:`~fvlm_pacs.segmentation.totalsegmentator.run_totalsegmentator` →
``totalsegmentator.python_api.totalsegmentator`` (reorientation, 3 mm resampling, nnU-Net
preprocessing, sliding-window inference in worker processes, export, resampling back) on CPU.

Every test blocks the network (any socket that is not a Unix socket or loopback fails and is
recorded) and points ``HOME`` at ``tmp_path``, so a download, a usage-statistics POST or a
``~/.totalsegmentator`` written behind the provider's back shows as a failure.

Skipped unless TotalSegmentator is installed (``pip install 'fvlm_pacs[totalseg]'``), except
with ``FVLM_PACS_REQUIRE_TOTALSEG=1``, which ``.ci/run`` sets in the venv it installs the extra
into, so that these tests cannot pass there by being skipped.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if os.environ.get("FVLM_PACS_REQUIRE_TOTALSEG") == "1":
    importlib.import_module("totalsegmentator")  # an ImportError fails the run
    importlib.import_module("nibabel")
pytest.importorskip(
    "totalsegmentator",
    reason="TotalSegmentator is not installed (pip install 'fvlm_pacs[totalseg]')",
)
pytest.importorskip("nibabel", reason="nibabel is not installed (the 'totalseg' extra)")

from scipy import ndimage  # noqa: E402

from fvlm_pacs.codes import AnatomyTable, load_anatomies  # noqa: E402
from fvlm_pacs.domain import Volume  # noqa: E402
from fvlm_pacs.segmentation import SegmentationUnavailable, make_provider  # noqa: E402
from fvlm_pacs.studies.assembly import assemble_series  # noqa: E402
from fvlm_pacs.synthetic import SeriesSpec, SyntheticHU, ct_series, write_series  # noqa: E402
from tests.test_segmentation import installed_version  # noqa: E402
from tests.totalseg_weights import (  # noqa: E402
    DATASET,
    TASK_ID,
    TRAINER,
    build_fast_total,
    tree_digest,
)

ENV_KEYS = (
    "TOTALSEG_HOME_DIR",
    "TOTALSEG_WEIGHTS_PATH",
    "nnUNet_results",
    "nnUNet_raw",
    "nnUNet_preprocessed",
)
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(scope="module")
def table() -> AnatomyTable:
    return load_anatomies("ct-rate")


@pytest.fixture(autouse=True)
def trainer_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let nnU-Net find the model's trainer class where its trainer search cannot run.

    ``nnUNetPredictor`` finds the trainer by importing every module under
    ``nnunetv2/training/nnUNetTrainer`` until one defines the name; one of them (the Primus
    trainers) imports ``timm``, which needs a working ``torchvision``. A CPU-only torch next to
    the CUDA torchvision wheel that pip takes from PyPI has no working torchvision (its
    operators fail to load), so that search fails before it reaches our trainer. Only then is
    the search replaced by importing the module that defines the trainer, the class nnU-Net
    would find; everything else stays real.
    """
    import nnunetv2.inference.predict_from_raw_data as prd
    import totalsegmentator.nnunet  # noqa: F401  (installs TotalSegmentator's own lookup)

    try:
        importlib.import_module("timm")
        return
    except Exception:  # ImportError, or RuntimeError from a torchvision that cannot load
        pass
    search = prd.recursive_find_trainer_class_by_name

    def lookup(name: str) -> Any:
        if name == TRAINER:
            module = importlib.import_module(
                "nnunetv2.training.nnUNetTrainer.variants.training_length."
                "nnUNetTrainer_Xepochs_NoMirroring"
            )
            return getattr(module, name)
        return search(name)

    monkeypatch.setattr(prd, "recursive_find_trainer_class_by_name", lookup)


@pytest.fixture(autouse=True)
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail and record every name lookup or connection that is not loopback or a Unix socket
    (nnU-Net's worker processes talk over Unix sockets). Worker processes are started with
    ``spawn`` and do not inherit this; they only preprocess and export."""
    attempts: list[Any] = []
    connect, connect_ex, getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def allowed(sock: socket.socket, address: Any) -> bool:
        return sock.family == socket.AF_UNIX or (
            isinstance(address, tuple) and str(address[0]) in _LOOPBACK
        )

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        if not allowed(self, address):
            attempts.append(("connect", address))
            raise OSError(f"network blocked in this test: connect {address!r}")
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> Any:
        if not allowed(self, address):
            attempts.append(("connect_ex", address))
            raise OSError(f"network blocked in this test: connect {address!r}")
        return connect_ex(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and str(host) not in _LOOPBACK:
            attempts.append(("getaddrinfo", host))
            raise socket.gaierror(f"network blocked in this test: resolve {host!r}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


@pytest.fixture(autouse=True)
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of our own and none of the TotalSegmentator / nnU-Net variables set."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    return home


class Spy:
    """What TotalSegmentator saw: environment during the call, the config its usage statistics
    were judged on, the weights it asked for."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.usage_configs: list[dict[str, Any] | None] = []
        self.weights_requested: list[Any] = []


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    import totalsegmentator.python_api as api

    s = Spy()
    real_run: Callable[..., Any] = api.totalsegmentator
    real_usage: Callable[..., Any] = api.send_usage_stats
    real_download: Callable[..., Any] = api.download_pretrained_weights

    def run(*args: Any, **kwargs: Any) -> Any:
        env = {k: os.environ.get(k) for k in ENV_KEYS}
        result = real_run(*args, **kwargs)
        home = Path(env["TOTALSEG_HOME_DIR"] or "")
        config = (home / "config.json").read_text(encoding="utf-8") if home.is_dir() else None
        s.calls.append({"env": env, "kwargs": kwargs, "config_after": config})
        return result

    def usage(config: Any, params: Any) -> Any:
        s.usage_configs.append(dict(config) if config is not None else None)
        return real_usage(config, params)

    def download(task_id: Any) -> Any:
        s.weights_requested.append(task_id)
        return real_download(task_id)

    # run_totalsegmentator imports the function from the module at each call
    monkeypatch.setattr(api, "totalsegmentator", run)
    monkeypatch.setattr(api, "send_usage_stats", usage)
    monkeypatch.setattr(api, "download_pretrained_weights", download)
    yield s


def study(tmp_path: Path, hu: SyntheticHU | None = None) -> tuple[Volume, list[Path]]:
    """A 40 × 64 × 64 CT (1 mm slices, 0.8 mm pixels) and its files."""
    datasets = ct_series(SeriesSpec(), hu=hu)
    volume, _ = assemble_series(datasets)
    return volume, write_series(datasets, tmp_path / "ct")


def box_phantom(k: int, rows: int, cols: int) -> np.ndarray:
    """Air with a dense box off-centre in every axis (slices 4-18, rows 6-25, columns 34-57):
    a flipped or swapped axis anywhere would move it."""
    img = np.full((rows, cols), -1000.0)
    if 4 <= k < 19:
        img[6:26, 34:58] = 1000.0
    return img


def test_real_run_fast_total_gives_heart_everywhere(
    tmp_path: Path,
    table: AnatomyTable,
    spy: Spy,
    network_attempts: list[Any],
    fresh_home: Path,
) -> None:
    """Class ``heart`` wins in every voxel: the label id travels from TotalSegmentator's class
    map through the real run, back onto the CT grid and into our ``heart`` anatomy; nothing is
    downloaded or sent and the user's home is left alone."""
    weights = build_fast_total(tmp_path / "weights", mode="constant", winner="heart")
    # a folder of an older release next to it: TotalSegmentator deletes such folders in the
    # weights directory it is given, so it must never be given the site's
    (weights / f"{DATASET}_v204" / "keep.txt").parent.mkdir()
    (weights / f"{DATASET}_v204" / "keep.txt").write_text("site data", encoding="utf-8")
    before = tree_digest(weights)
    checkpoint = next(weights.glob(f"{DATASET}/*/fold_0/checkpoint_final.pth"))
    volume, paths = study(tmp_path)

    provider = make_provider(
        "totalsegmentator", table, weights_dir=weights, fast=True, device="cpu"
    )
    result = provider.segment(volume, paths)

    assert result.source == "totalsegmentator"
    assert result.anatomies == table.names
    assert result.array.shape == volume.array.shape
    heart = table.label_of("heart")
    assert set(np.unique(result.array).tolist()) == {heart}
    assert result.provenance == {
        "task": "total",
        "fast": True,
        "tasks": [TASK_ID],
        "version": installed_version("TotalSegmentator"),
        "weights_sha256": {str(TASK_ID): hashlib.sha256(checkpoint.read_bytes()).hexdigest()},
    }

    # nothing downloaded, nothing changed in the weights, no network at all
    assert network_attempts == []
    assert spy.weights_requested == [TASK_ID]
    assert tree_digest(weights) == before
    # TotalSegmentator ran with a private home and a private weights directory linking the
    # site's task folder only, not ~/.totalsegmentator and not the site's folder itself
    (call,) = spy.calls
    env = call["env"]
    private_home = Path(env["TOTALSEG_HOME_DIR"])
    assert env["TOTALSEG_WEIGHTS_PATH"] == str(private_home / "weights")
    assert env["nnUNet_results"] == str(private_home / "weights")
    assert private_home != fresh_home / ".totalsegmentator"
    assert fresh_home not in private_home.parents
    assert not (fresh_home / ".totalsegmentator").exists()
    assert not private_home.exists()  # a temporary directory, gone after the run
    assert call["kwargs"]["ml"] is True and call["kwargs"]["task"] == "total"
    # usage statistics were judged on a config that forbids them, and none were sent
    assert spy.usage_configs and all(
        c is not None and c["send_usage_stats"] is False for c in spy.usage_configs
    )
    # the process environment is as before the run
    assert all(key not in os.environ for key in ENV_KEYS)


def test_real_run_keeps_the_geometry(
    tmp_path: Path, table: AnatomyTable, network_attempts: list[Any]
) -> None:
    """A network that calls bright voxels ``heart`` and the others ``lung_upper_lobe_left``
    finds the off-centre box where it is on the CT grid: orientation, 3 mm resampling and the
    way back are right, and two label ids arrive as two anatomies."""
    weights = build_fast_total(
        tmp_path / "weights", mode="threshold", above="heart", below="lung_upper_lobe_left"
    )
    volume, paths = study(tmp_path, box_phantom)
    provider = make_provider(
        "totalsegmentator", table, weights_dir=weights, fast=True, device="cpu"
    )
    result = provider.segment(volume, paths)

    heart, lung = table.label_of("heart"), table.label_of("lung")
    bright = np.asarray(volume.array) > 0
    assert result.array.shape == volume.array.shape
    assert set(np.unique(result.array).tolist()) == {heart, lung}
    # 3 mm there and back blurs the edges by about one voxel; away from them it is exact
    inside = ndimage.binary_erosion(bright, iterations=2)
    outside = ndimage.binary_erosion(~bright, iterations=2, border_value=1)
    assert inside.sum() > 1000
    assert np.all(result.array[inside] == heart)
    assert np.all(result.array[outside] == lung)
    assert np.mean((result.array == heart) == bright) > 0.98
    # the heart found lies in the box's extent only
    found = np.argwhere(result.array == heart)
    assert found.min(axis=0).tolist() >= [3, 5, 33]
    assert found.max(axis=0).tolist() <= [19, 26, 58]
    assert network_attempts == []


@pytest.mark.parametrize("suffix", ["_v204", "_copy"])
def test_wrong_folder_name_is_refused_not_downloaded(
    tmp_path: Path,
    table: AnatomyTable,
    network_attempts: list[Any],
    suffix: str,
) -> None:
    weights = build_fast_total(tmp_path / "weights")
    (weights / DATASET).rename(weights / f"{DATASET}{suffix}")
    before = tree_digest(weights)
    volume, paths = study(tmp_path)
    provider = make_provider(
        "totalsegmentator", table, weights_dir=weights, fast=True, device="cpu"
    )
    # TotalSegmentator would delete the _v204 folder and try github.com for the other
    with pytest.raises(SegmentationUnavailable, match="lacks the weights of task"):
        provider.segment(volume, paths)
    assert network_attempts == []
    assert tree_digest(weights) == before
