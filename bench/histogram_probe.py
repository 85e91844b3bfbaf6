"""What the anatomy HU histograms alone carry, per finding: the anatomy's own bins against the
same plus its surroundings and volume (``model.histogram_shell`` / ``histogram_volume``).

    python bench/histogram_probe.py --train DIR [--train-cases N] [--split-seed S]
        --heldout DIR [--shell 2] [--seed 0] [--threads N]

No model and no training run: per case and anatomy,
:func:`fvlm_pacs.model.histogram.anatomy_histograms` — the features the model's histogram MLP
receives — on the phantom's own grid with its exact label map (the model computes them on its
resampled input; the same bins, a finer or coarser grid). Then per finding a ridge logistic
probe on the features of the finding's anatomy (``linear_probe.probe_scores``: λ by 5-fold
cross-validation on the train cases), fitted on the train part of ``--train``'s split (the
demo build's, ``--split-seed`` = its seed) and scored as AUC on ``--heldout``. Two feature sets
in the same run on the same cases:

* **own** — the anatomy's voxels only (``histogram_edges``, what ``fvlm-demo 3`` has);
* **+ surroundings, volume** — plus the histogram of the voxels within ``--shell`` voxels of
  the anatomy that belong to no anatomy, and its voxel count.

Where *own* is near chance and the second is not, the surroundings or the size carry the
finding and a model with the options can learn it; where both are near chance, no histogram
will. A probe is told the labels: this is an upper bound on what zero-shot scoring of the same
features can reach, not a zero-shot result. Prints per finding AUCs, the means and their paired
bootstrap 95 % interval over held-out cases. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from linear_probe import probe_scores  # noqa: E402  (bench/)
from synthetic_zero_shot import bootstrap_diff, fmt  # noqa: E402  (bench/)

from fvlm_pacs.codes import load_anatomies, load_findings  # noqa: E402
from fvlm_pacs.evaluation import roc_auc  # noqa: E402
from fvlm_pacs.model.dataset import read_synthetic  # noqa: E402
from fvlm_pacs.model.histogram import (  # noqa: E402
    HISTOGRAM_EDGES,
    anatomy_histograms,
    feature_count,
)
from fvlm_pacs.model.intensity import scale_hu  # noqa: E402
from fvlm_pacs.model.lesions import anatomy_lesions  # noqa: E402
from fvlm_pacs.model.zeroshot_eval import dataset_split, load_case  # noqa: E402

PROFILE = "ct-rate"


def case_features(
    folder: Path, anatomies: tuple[str, ...], shell: int
) -> tuple[np.ndarray, dict[str, int]]:
    """float [K, F] features of one synthetic case (own, surroundings, volume) and its labels."""
    volume, labelmap, truth = load_case(folder, anatomies)
    image = torch.from_numpy(scale_hu(np.asarray(volume.voxels.array)))[None, None]
    labels = torch.from_numpy(np.asarray(labelmap.array).astype(np.int64))[None]
    feats = anatomy_histograms(
        image, labels, len(anatomies), HISTOGRAM_EDGES, shell=shell, volume=True
    )
    spacing = tuple(float(v) for v in volume.spacing)
    lesions = anatomy_lesions(image, labels, len(anatomies), spacing)  # type: ignore[arg-type]
    return torch.cat([feats, lesions], dim=-1)[0].numpy(), truth


def collect(
    root: Path, cases: tuple[str, ...], anatomies: tuple[str, ...], shell: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """[N, K, F] features and per-finding labels of ``cases`` under ``root``."""
    rows, truth = [], []
    for cid in cases:
        f, t = case_features(root / cid, anatomies, shell)
        rows.append(f)
        truth.append(t)
    names = sorted({n for t in truth for n in t})
    labels = {n: np.asarray([t.get(n, 0) for t in truth], dtype=np.int8) for n in names}
    return np.stack(rows), labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True, help="a demo build's data folder")
    ap.add_argument("--train-cases", type=int, default=None, help="first N of its train part")
    ap.add_argument("--split-seed", type=int, default=1, help="the build's seed (its split)")
    ap.add_argument("--heldout", type=Path, required=True, help="phantoms neither part holds")
    ap.add_argument("--shell", type=int, default=2, help="surroundings width in voxels")
    ap.add_argument("--seed", type=int, default=0, help="CV folds and bootstrap")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shell < 1:
        ap.error("--shell: at least 1 voxel")

    anatomies = load_anatomies(PROFILE)
    findings = load_findings(anatomies)
    split = dataset_split(args.train / "manifest.csv", args.split_seed)
    train_cases = tuple(split.train[: args.train_cases])
    held_cases = tuple(c.case_id for c in read_synthetic(args.heldout / "manifest.csv"))
    if args.train.resolve() == args.heldout.resolve():
        ap.error("--train and --heldout must be different phantom sets")

    t0 = time.perf_counter()
    x_tr, y_tr = collect(args.train, train_cases, anatomies.names, args.shell)
    x_te, y_te = collect(args.heldout, held_cases, anatomies.names, args.shell)
    feat_s = time.perf_counter() - t0
    own = len(HISTOGRAM_EDGES) + 1
    histograms = feature_count(HISTOGRAM_EDGES, args.shell, True)
    sets = {
        "own": slice(0, own),
        "+surroundings,volume": slice(0, histograms),
        "+lesions": slice(0, None),
    }

    findings = tuple(f for f in findings if f.name in y_te and f.name in y_tr)
    names = [f.name for f in findings]
    columns: dict[str, dict[str, np.ndarray]] = {c: {} for c in sets}
    for f in findings:
        a = anatomies.names.index(f.anatomy)
        for c, cols in sets.items():
            s = probe_scores(x_tr[:, a, cols], y_tr[f.name], x_te[:, a, cols], args.seed)
            columns[c][f.name] = s if s is not None else np.full(len(held_cases), np.nan)
    auc = {c: {n: roc_auc(s[n], y_te[n]) for n in names} for c, s in columns.items()}
    usable = [n for n in names if all(auc[c][n] is not None for c in columns)]

    print(f"train: {len(train_cases)} cases of {args.train}; held-out: {len(held_cases)} cases")
    print(f"shell {args.shell} voxels; features {feat_s:.0f} s, threads {torch.get_num_threads()}")
    print(f"{'finding':36s} {'pos tr/ho':>9s} " + " ".join(f"{c:>21s}" for c in columns))
    for n in names:
        pos = f"{int(y_tr[n].sum())}/{int(y_te[n].sum())}"
        print(f"{n:36s} {pos:>9s} " + " ".join(f"{fmt(auc[c][n]):>21s}" for c in columns))
    means = {c: float(np.mean([auc[c][n] for n in usable])) for c in columns}
    print(f"{'mean (' + str(len(usable)) + ' findings)':36s} {'':9s} " + " ".join(
        f"{fmt(means[c]):>21s}" for c in columns))  # fmt: skip
    print()
    for first, second in zip(list(columns), list(columns)[1:]):
        lo, hi = bootstrap_diff(columns[second], columns[first], y_te, usable, args.seed)
        gain = means[second] - means[first]
        print(f"{second} - {first} (paired bootstrap, 95 %): {gain:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
