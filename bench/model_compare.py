"""Trained fVLM models, zero-shot, on the same independent phantoms: which one to ship.

    python bench/model_compare.py --models DIR DIR [DIR ...] --heldout DIR [--scores DIR]
        [--segmentation exact|builtin] [--seed 0] [--threads N]

``--models``: model folders of ours, the first the reference (e.g. the shipped demo,
``fvlm_pacs/models/demo``); ``--heldout``: a ``manifest.csv`` folder of phantoms none of them
was trained on (``fvlm-pacs synth --seed S`` with a seed block disjoint from the builds': case i
uses seed S + i). Each model is scored as it would serve — the public
:class:`~fvlm_pacs.model.Predictor` in ``crops`` mode with its own prompts (``prompts.yaml``,
else ``mappings/findings.yaml``) — on every case. Prints per-finding AUC, the mean AUC of each
and each model − the first with a paired bootstrap 95 % interval over cases (the same
resampled cases for both). ``--scores`` keeps each model's scores there (named by the SHA-256
of its weights, of its prompt pairs and of the manifest; served: also of the segmentation
network, and its upsampling), so a later comparison re-scores only
new models. Why a separate set: a demo build's own test part holds 36 phantoms, where one
finding with a single positive case moves a 16-finding mean by up to 0.06. A model folder that
records its training cases (``training_cases.json``) and overlaps ``--heldout`` is refused. The
interval covers the choice of cases, not the spread between training runs of one recipe.
``--segmentation builtin`` scores each model on the label maps of its own folder's ``builtin``
segmentation network (``segmentation/``) instead of the phantoms' exact ones: the models as a
demo study gets them. A second table gives each finding's AUC among only the cases whose
anatomy holds another finding (:func:`~fvlm_pacs.evaluation.co_finding_auc`): a model that scores
"abnormal lung" rather than the finding is near chance there. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from synthetic_zero_shot import aucs, bootstrap_diff, fmt, mean_of  # noqa: E402  (bench/)

from fvlm_pacs.evaluation import co_finding_auc, co_finding_cases  # noqa: E402
from fvlm_pacs.model import Predictor  # noqa: E402
from fvlm_pacs.model.checkpoint import sha256_file  # noqa: E402
from fvlm_pacs.model.dataset import read_synthetic  # noqa: E402
from fvlm_pacs.model.predictor import anatomy_table_for  # noqa: E402
from fvlm_pacs.model.provenance import training_overlap  # noqa: E402
from fvlm_pacs.model.zeroshot_eval import score_cases  # noqa: E402
from fvlm_pacs.segmentation import make_provider  # noqa: E402


def cache_stem(predictor: Predictor, manifest: Path) -> str:
    """What a model's scores on a manifest depend on: its weights, its prompt pairs (a model's
    ``prompts.yaml`` changes the scores without changing the weights) and the manifest."""
    prompts = hashlib.sha256(json.dumps(predictor.prompt_pairs(), sort_keys=True).encode())
    return f"{predictor.info.sha256[:16]}-{prompts.hexdigest()[:8]}-{sha256_file(manifest)[:16]}"


def scored(
    folder: Path,
    manifest: Path,
    cases: tuple[str, ...],
    store: Path | None,
    segmentation: str = "exact",
) -> tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(name, scores, labels) of one model on ``cases``, from ``store`` when scored before;
    ``segmentation`` ``builtin``: on the label maps of the folder's own segmentation network."""
    predictor = Predictor(folder, device="cpu")
    name = f"{predictor.info.name} {predictor.info.version} ({folder})"
    provider = None
    stem = cache_stem(predictor, manifest)
    if segmentation == "builtin":
        seg_dir = folder / "segmentation"
        table = anatomy_table_for(predictor.anatomies)  # the masks must carry the model's anatomies
        provider = make_provider("builtin", table, model_dir=seg_dir)
        upsampling = provider.check().config.upsampling  # type: ignore[attr-defined]
        # the masks change the scores: the network and how its labels reach the CT grid
        stem += f"-seg{sha256_file(seg_dir / 'model.safetensors')[:8]}-{upsampling}"
    key = f"{stem}.npz"
    if store is not None and (store / key).is_file():
        with np.load(store / key) as z:
            return (
                name,
                {k[2:]: z[k] for k in z if k[:2] == "s:"},
                {k[2:]: z[k] for k in z if k[:2] == "l:"},
            )
    t0 = time.perf_counter()
    result = score_cases(predictor, manifest.parent, cases, provider)
    print(f"scored {name}: {len(cases)} cases in {time.perf_counter() - t0:.0f} s")
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        arrays = {f"s:{k}": v for k, v in result.scores.items()}
        arrays.update({f"l:{k}": v for k, v in result.labels.items()})
        np.savez(store / key, **arrays)
    return name, result.scores, result.labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, nargs="+", required=True, help="first: reference")
    ap.add_argument("--heldout", type=Path, required=True, help="folder with manifest.csv")
    ap.add_argument("--scores", type=Path, help="folder keeping each model's scores")
    ap.add_argument(
        "--segmentation",
        choices=["exact", "builtin"],
        default="exact",
        help="label maps: the phantoms' exact ones, or each model folder's builtin network's",
    )
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if len(args.models) < 2:
        ap.error("--models needs a reference and at least one model to compare with it")
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = args.heldout / "manifest.csv"
    cases = tuple(r.case_id for r in read_synthetic(manifest))
    for folder in args.models:
        seen = training_overlap(folder, manifest, cases)
        if seen:
            print(f"{folder} was trained on {len(seen)} of these cases (e.g. {seen[0]})")
            return 2
    runs = [
        scored(folder, manifest, cases, args.scores, args.segmentation) for folder in args.models
    ]
    labels = runs[0][2]
    names = [n for n in labels if all(n in r[1] for r in runs)]
    table = [aucs(r[1], labels) for r in runs]
    for i, (name, _, _) in enumerate(runs):
        print(f"[{i}] {name}")
    head = "".join(f"{f'[{i}]':>7s}" for i in range(len(runs)))
    print(f"\n{'finding':36s} {'pos':>4s}{head}")
    for n in names:
        row = "".join(f" {fmt(t[n])}" for t in table)
        print(f"{n:36s} {int(labels[n].sum()):4d}{row}")
    means = [mean_of(t, names) for t in table]
    print(f"{'mean':36s} {'':4s}" + "".join(f" {m:6.3f}" for m in means))
    print(f"\npaired bootstrap over {len(cases)} cases, 95 %:")
    for i in range(1, len(runs)):
        lo, hi = bootstrap_diff(runs[i][1], runs[0][1], labels, names, args.seed)
        print(f"  [{i}] − [0]: {means[i] - means[0]:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    # the reference's finding -> anatomy table, as `fvlm-pacs eval` groups them
    print_co_finding(runs, labels, names, Predictor(args.models[0], device="cpu").anatomy_of())
    return 0


def print_co_finding(
    runs: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]],
    labels: dict[str, np.ndarray],
    names: list[str],
    anatomy_of: dict[str, str],
) -> None:
    """AUC among the cases whose anatomy holds another finding (:func:`co_finding_auc`): does a
    model score the finding, or its anatomy being abnormal?"""
    both = {n: labels[n] for n in names}
    table = [co_finding_auc({n: r[1][n] for n in names}, both, anatomy_of) for r in runs]
    cases = co_finding_cases(both, anatomy_of)
    shown = [n for n in names if table[0][n] is not None]
    if not shown:
        return
    print("\nAUC among the cases whose anatomy holds another finding (co-finding AUC):")
    head = "".join(f"{f'[{i}]':>7s}" for i in range(len(runs)))
    print(f"{'finding':36s} {'n':>4s}{head}")
    for n in shown:
        print(f"{n:36s} {int(cases[n].sum()):4d}" + "".join(f" {fmt(t[n])}" for t in table))
    print(f"{'mean':36s} {'':4s}" + "".join(f" {mean_of(t, shown):6.3f}" for t in table))


if __name__ == "__main__":
    raise SystemExit(main())
