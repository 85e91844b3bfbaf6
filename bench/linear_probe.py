"""Linear probes: does a trained fVLM's image side carry each finding, whatever the prompts say?

    python bench/linear_probe.py --model DIR --train DIR [--train-cases N] [--split-seed S]
        --heldout DIR [--random-peer] [--cache DIR] [--seed 0] [--threads N]

Zero-shot scores a finding by comparing an anatomy's embedding with two prompts. When that is
near chance, either the embedding does not separate the cases (the image encoder: steps, data,
resolution) or it does and the prompts point the wrong way (the text side). A linear probe tells
the two apart: per finding, an L2-regularised logistic regression on the anatomy's embedding,
fitted on labelled cases of ``--train`` (by default the train part of the model's own build,
``--split-seed`` = the build's seed; the probe may see cases the model trained on, it is the
``--heldout`` score that counts) and scored as AUC on ``--heldout``, phantoms neither saw. The
same probe is fitted on two peers, in the same run and on the same cases:

* **intensity** — a histogram of the anatomy's HU on the phantom's own grid (fractions in HU
  bands, percentiles, size). No model: what the voxels carry at this resolution. Where it is
  high and the embedding's probe is not, the encoder lost the finding; where both are near
  chance, the finding is too small or faint at this grid for a histogram — a shape- or
  location-aware model may still see it, so this is not a ceiling;
* **random** (``--random-peer``) — the same architecture with the image encoder freshly
  initialised (seeded): what the architecture gives before any training.

Prints per finding: positives in train / held-out, zero-shot AUC (the model as served, its own
prompts), probe AUCs, and each mean with a paired bootstrap 95 % interval against zero-shot.
``--cache`` keeps embeddings and features per model and manifest, so a rerun only fits probes.
A model that records its training cases and overlaps ``--heldout`` is refused. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model_compare import cache_stem  # noqa: E402  (bench/)
from synthetic_zero_shot import bootstrap_diff, fmt  # noqa: E402  (bench/)

from fvlm_pacs.evaluation import roc_auc  # noqa: E402
from fvlm_pacs.model import Predictor  # noqa: E402
from fvlm_pacs.model.dataset import read_synthetic  # noqa: E402
from fvlm_pacs.model.provenance import training_overlap  # noqa: E402
from fvlm_pacs.model.zeroshot_eval import dataset_split, load_case  # noqa: E402

HU_BANDS = ((-1100, -950), (-950, -850), (-850, -700), (-700, -300), (-300, -100), (-100, 100),
            (100, 300), (300, 3000))  # fmt: skip
PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
LAMBDAS = (0.01, 0.1, 1.0, 10.0, 100.0)
FOLDS = 5
MIN_POSITIVES = 5


@dataclass(frozen=True)
class CaseFeatures:
    """Per case: zero-shot scores, embeddings and intensity features of each anatomy, labels."""

    scores: dict[str, np.ndarray]  # finding -> [N]
    labels: dict[str, np.ndarray]  # finding -> [N]
    embeddings: dict[str, np.ndarray]  # anatomy -> [N, E], NaN rows where not assessed
    intensity: dict[str, np.ndarray]  # anatomy -> [N, F], NaN rows where absent


def intensity_features(hu: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The anatomy's HU histogram: log voxel count, mean, std, percentiles, band fractions."""
    values = hu[mask]
    if values.size == 0:
        return np.full(3 + len(PERCENTILES) + len(HU_BANDS), np.nan, dtype=np.float32)
    bands = [np.mean((values >= lo) & (values < hi)) for lo, hi in HU_BANDS]
    out = [math.log(values.size), values.mean(), values.std()]
    out += list(np.percentile(values, PERCENTILES)) + bands
    return np.asarray(out, dtype=np.float32)


def features(
    predictor: Predictor, root: Path, cases: tuple[str, ...], cache: Path | None, tag: str
) -> CaseFeatures:
    """Run the predictor on every case once; keep scores, embeddings, intensity and labels."""
    ids = hashlib.sha256("\n".join(cases).encode()).hexdigest()[:8]
    key = f"probe-{tag}-{cache_stem(predictor, root / 'manifest.csv')}-{ids}.npz"
    if cache is not None and (cache / key).is_file():
        with np.load(cache / key) as z:
            parts: dict[str, dict[str, np.ndarray]] = {"s": {}, "l": {}, "e": {}, "i": {}}
            for k in z:
                parts[k[0]][k[2:]] = z[k]
        return CaseFeatures(parts["s"], parts["l"], parts["e"], parts["i"])

    names = [f.name for f in predictor.findings]
    scores = {n: np.full(len(cases), np.nan) for n in names}
    labels = {n: np.zeros(len(cases), dtype=np.int8) for n in names}
    emb: dict[str, list[np.ndarray | None]] = {a: [] for a in predictor.anatomies}
    inten: dict[str, list[np.ndarray]] = {a: [] for a in predictor.anatomies}
    t0 = time.perf_counter()
    for i, cid in enumerate(cases):
        volume, labelmap, truth = load_case(root / cid, predictor.anatomies)
        prediction = predictor.run(volume, labelmap)
        for f in prediction.findings:
            if f.score is not None:
                scores[f.finding][i] = f.score
        for n in names:
            labels[n][i] = truth.get(n, 0)
        hu = np.asarray(volume.voxels.array)
        lab = np.asarray(labelmap.array)
        for k, a in enumerate(predictor.anatomies, start=1):
            emb[a].append(prediction.embeddings.get(a))
            inten[a].append(intensity_features(hu, lab == k))
        if (i + 1) % 50 == 0:
            print(f"  {tag}: {i + 1}/{len(cases)} cases, {time.perf_counter() - t0:.0f} s")
    dim = next(e.shape[0] for rows in emb.values() for e in rows if e is not None)
    out = CaseFeatures(
        scores,
        labels,
        {
            a: np.stack([e if e is not None else np.full(dim, np.nan, np.float32) for e in rows])
            for a, rows in emb.items()
        },
        {a: np.stack(rows) for a, rows in inten.items()},
    )
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        arrays = {f"s:{k}": v for k, v in out.scores.items()}
        arrays.update({f"l:{k}": v for k, v in out.labels.items()})
        arrays.update({f"e:{k}": v for k, v in out.embeddings.items()})
        arrays.update({f"i:{k}": v for k, v in out.intensity.items()})
        np.savez(cache / key, **arrays)
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float, iters: int = 50) -> np.ndarray:
    """Ridge logistic regression by Newton's method; returns [bias, w...] (bias not penalised).

    ``x`` standardised [N, F]; the penalty λ‖w‖² keeps it defined when the classes separate.
    """
    a = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(a.shape[1])
    reg = np.full(a.shape[1], lam)
    reg[0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        grad = a.T @ (p - y) + reg * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(reg) + 1e-9 * np.eye(a.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def probe_scores(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int
) -> np.ndarray | None:
    """Held-out scores of a probe whose λ is chosen by cross-validated AUC on the train cases.

    Rows with NaN (anatomy not assessed) are left out of fitting and score NaN; None when the
    train cases have fewer than :data:`MIN_POSITIVES` of either class.
    """
    ok = np.isfinite(x_train).all(1)
    x, y = x_train[ok], y_train[ok].astype(float)
    if min(y.sum(), len(y) - y.sum()) < MIN_POSITIVES:
        return None
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    folds = np.random.default_rng(seed).permutation(len(z)) % FOLDS
    best, best_auc = LAMBDAS[-1], -1.0
    for lam in LAMBDAS:
        oof = np.full(len(z), np.nan)
        for k in range(FOLDS):
            tr = folds != k
            w = fit_logistic(z[tr], y[tr], lam)
            oof[~tr] = w[0] + z[~tr] @ w[1:]
        auc = roc_auc(oof, y)
        if auc is not None and auc > best_auc:
            best, best_auc = lam, auc
    w = fit_logistic(z, y, best)
    out = np.full(len(x_test), np.nan)
    okt = np.isfinite(x_test).all(1)
    out[okt] = w[0] + ((x_test[okt] - mu) / sd) @ w[1:]
    return out


def randomised(predictor: Predictor, seed: int) -> Predictor:
    """The same predictor with its image encoder re-initialised (the untrained peer)."""
    torch.manual_seed(seed)
    model = predictor.model
    image_side = [model.visual_encoder, model.vision_projs, model.attention]
    for part in image_side:
        for m in part.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    with torch.no_grad():
        torch.nn.init.normal_(model.query_tokens, std=0.02)
    return predictor


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="trained fVLM model folder")
    ap.add_argument("--train", type=Path, required=True, help="labelled phantoms (manifest.csv)")
    ap.add_argument("--train-cases", type=int, default=300, help="at most this many of its part")
    ap.add_argument("--split-seed", type=int, default=1, help="seed of --train's case split")
    ap.add_argument("--heldout", type=Path, required=True, help="independent phantoms")
    ap.add_argument("--random-peer", action="store_true", help="also probe an untrained encoder")
    ap.add_argument("--cache", type=Path, help="folder keeping embeddings and features")
    ap.add_argument("--seed", type=int, default=0, help="CV folds, random peer, bootstrap")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    heldout_manifest = args.heldout / "manifest.csv"
    held_cases = tuple(c.case_id for c in read_synthetic(heldout_manifest))
    overlap = training_overlap(args.model, heldout_manifest, held_cases)
    if overlap:
        print(f"{args.model} was trained on {len(overlap)} --heldout cases (e.g. {overlap[0]})")
        return 2
    split = dataset_split(args.train / "manifest.csv", args.split_seed)
    train_cases = tuple(split.train[: args.train_cases])

    t0 = time.perf_counter()
    predictor = Predictor(args.model, device="cpu")
    runs = {
        "fvlm": (
            features(predictor, args.train, train_cases, args.cache, "fvlm"),
            features(predictor, args.heldout, held_cases, args.cache, "fvlm"),
        )
    }
    if args.random_peer:
        rnd = randomised(Predictor(args.model, device="cpu"), args.seed)
        runs["random"] = (
            features(rnd, args.train, train_cases, args.cache, f"random{args.seed}"),
            features(rnd, args.heldout, held_cases, args.cache, f"random{args.seed}"),
        )
    feat_s = time.perf_counter() - t0

    train_f, held_f = runs["fvlm"]
    anatomy_of = {f.name: f.anatomy for f in predictor.findings}
    names = [f.name for f in predictor.findings]
    columns: dict[str, dict[str, np.ndarray]] = {"zero-shot": held_f.scores}
    probes: dict[str, dict[str, np.ndarray]] = {"probe(fvlm)": {}, "probe(intensity)": {}}
    if args.random_peer:
        probes["probe(random)"] = {}
    for n in names:
        a = anatomy_of[n]
        y_tr = train_f.labels[n]
        jobs = {
            "probe(fvlm)": (train_f.embeddings[a], held_f.embeddings[a]),
            "probe(intensity)": (train_f.intensity[a], held_f.intensity[a]),
        }
        if args.random_peer:
            rtr, rte = runs["random"]
            jobs["probe(random)"] = (rtr.embeddings[a], rte.embeddings[a])
        for col, (xtr, xte) in jobs.items():
            s = probe_scores(xtr, y_tr, xte, args.seed)
            probes[col][n] = s if s is not None else np.full(len(held_cases), np.nan)
    columns.update(probes)

    labels = held_f.labels
    auc = {c: {n: roc_auc(s[n], labels[n]) for n in names} for c, s in columns.items()}
    usable = [n for n in names if all(auc[c][n] is not None for c in columns)]
    head = f"{'finding':36s} {'pos tr/ho':>9s} " + " ".join(f"{c:>16s}" for c in columns)
    print(f"\ntrain: {len(train_cases)} cases of {args.train}; held-out: {len(held_cases)} cases")
    print(head)
    for n in names:
        pos = f"{int(train_f.labels[n].sum())}/{int(labels[n].sum())}"
        cells = " ".join(f"{fmt(auc[c][n]):>16s}" for c in columns)
        print(f"{n:36s} {pos:>9s} {cells}")
    means = {c: float(np.mean([auc[c][n] for n in usable])) for c in columns}
    print(f"{'mean (' + str(len(usable)) + ' findings)':36s} {'':9s} " + " ".join(
        f"{fmt(means[c]):>16s}" for c in columns))  # fmt: skip
    print("\nagainst zero-shot (paired bootstrap over held-out cases, 95 %):")
    for c in columns:
        if c == "zero-shot":
            continue
        lo, hi = bootstrap_diff(columns[c], columns["zero-shot"], labels, usable, args.seed)
        print(f"  {c:18s} {means[c] - means['zero-shot']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    lo, hi = bootstrap_diff(
        columns["probe(fvlm)"], columns["probe(intensity)"], labels, usable, args.seed
    )
    gap = means["probe(fvlm)"] - means["probe(intensity)"]
    print(f"  probe(fvlm) - probe(intensity): {gap:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    print(f"\nfeatures {feat_s:.0f} s (cached ones free), threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
