"""What the ``builtin`` network's masks do to the voxels a model reads, against exact masks.

    python bench/served_masks.py --heldout DIR --model-dir DIR [DIR ...] [--cases N]
        [--threads 1]

No fVLM model: on phantoms of a ``manifest.csv`` folder (held out from the networks' training),
two plain read-outs of the masks, each with the phantom's exact label map (the peer), the exact
label map sent to each network's 4 mm working grid and back by nearest neighbour (the grid's own
loss), and each network's masks as the provider serves them:

* lung findings: the AUC of "share of the lung mask's voxels at −300…100 HU" (dense lung) for
  atelectasis, consolidation, lung opacity and pleural effusion — what a lung histogram sees;
* pericardial effusion: the heart mask's volume over the exact heart's, in effusion cases and
  in as many others, and the share of it that is fluid outside every exact anatomy (−10…30 HU);
* coronary calcification: the AUC of "share of the heart mask's voxels at ≥ 300 HU" (what the
  heart histogram's top bins see), and in the calcified cases the share of the exact heart's
  ≥ 300 HU voxels (its plaques: the phantoms keep bone out of the heart) the mask covers.

Why: a model scored on exact masks can lose a finding when served because the mask moved, not
the model (bench/README.md, `builtin_segmentation.py`). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fvlm_pacs.evaluation import roc_auc  # noqa: E402
from fvlm_pacs.model.dataset import read_synthetic  # noqa: E402
from fvlm_pacs.model.predictor import anatomy_table_for  # noqa: E402
from fvlm_pacs.model.zeroshot_eval import load_case  # noqa: E402
from fvlm_pacs.segmentation import make_provider  # noqa: E402
from fvlm_pacs.segmentation.builtin import sample_nearest, to_working_grid  # noqa: E402

ANATOMIES = ("lung", "heart", "esophagus", "aorta")
LUNG, HEART = 1, 2
LUNG_FINDINGS = ("atelectasis", "consolidation", "lung_opacity", "pleural_effusion")
DENSE_HU = (-300.0, 100.0)
FLUID_HU = (-10.0, 30.0)
CALCIUM_HU = 300.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout", type=Path, required=True, help="folder with manifest.csv")
    ap.add_argument("--model-dir", type=Path, nargs="+", required=True, help="builtin networks")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = anatomy_table_for(ANATOMIES)
    nets = {str(d): make_provider("builtin", table, model_dir=d) for d in args.model_dir}
    grids = {name: provider.check().config for name, provider in nets.items()}  # type: ignore[attr-defined]
    kinds = ["exact"] + [f"roundtrip {n}" for n in nets] + [f"served {n}" for n in nets]
    dense: dict[str, list[float]] = {k: [] for k in kinds}
    heart: dict[str, dict[str, list[tuple[float, float]]]] = {
        k: {"effusion": [], "other": []} for k in kinds
    }
    calcium: dict[str, list[float]] = {k: [] for k in kinds}
    plaque_cover: dict[str, list[float]] = {k: [] for k in kinds}
    labels: list[dict[str, int]] = []
    others = 0
    rows = read_synthetic(args.heldout / "manifest.csv")[: args.cases]
    for row in rows:
        volume, exact, found = load_case(args.heldout / row.case_id, ANATOMIES)
        labels.append(found)
        hu, truth = volume.voxels.array, exact.array
        maps = {"exact": truth}
        for name, provider in nets.items():
            grid = to_working_grid(volume.voxels, grids[name])
            down = sample_nearest(truth, volume.voxels.affine, grid.shape, grid.affine)
            maps[f"roundtrip {name}"] = sample_nearest(
                down, grid.affine, truth.shape, volume.voxels.affine
            )
            maps[f"served {name}"] = provider.segment(volume, ()).array
        effusion = bool(found["pericardial_effusion"])
        keep_heart = effusion or others < 16
        others += 0 if effusion else 1
        fluid = (truth == 0) & (hu > FLUID_HU[0]) & (hu < FLUID_HU[1])
        exact_heart = max(1, int((truth == HEART).sum()))
        plaques = (truth == HEART) & (hu >= CALCIUM_HU)
        for kind, labelled in maps.items():
            lung = hu[labelled == LUNG]
            dense[kind].append(float(((lung >= DENSE_HU[0]) & (lung < DENSE_HU[1])).mean()))
            mask = labelled == HEART
            calcium[kind].append(float((hu[mask] >= CALCIUM_HU).mean()) if mask.any() else 0.0)
            if found["coronary_artery_wall_calcification"] and plaques.any():
                plaque_cover[kind].append(float((mask & plaques).sum() / plaques.sum()))
            if keep_heart:
                heart[kind]["effusion" if effusion else "other"].append(
                    (mask.sum() / exact_heart, (mask & fluid).sum() / exact_heart)
                )
    print(f"{len(rows)} phantoms from {args.heldout}; masks: {', '.join(kinds)}")
    print(f"\nAUC of the dense-lung share ({DENSE_HU[0]:g}…{DENSE_HU[1]:g} HU):")
    for finding in LUNG_FINDINGS:
        y = [f[finding] for f in labels]
        cells = "  ".join(f"{kind} {roc_auc(dense[kind], y):.3f}" for kind in kinds)
        print(f"  {finding} ({sum(y)} positive): {cells}")
    print("\nheart mask volume / exact heart, and its fluid share (mean):")
    for kind in kinds:
        parts = []
        for group, values in heart[kind].items():
            if values:
                ratio, fluid_share = np.mean(values, axis=0)
                parts.append(f"{group} ({len(values)}) ×{ratio:.2f}, fluid {fluid_share:.3f}")
        print(f"  {kind}: " + "; ".join(parts))
    y = [f["coronary_artery_wall_calcification"] for f in labels]
    print(f"\ncoronary calcification ({sum(y)} positive), heart mask at >= {CALCIUM_HU:g} HU:")
    for kind in kinds:
        share = np.asarray(calcium[kind]) * 1000
        with_, without = share[np.asarray(y, bool)], share[~np.asarray(y, bool)]
        print(
            f"  {kind}: AUC of its share {roc_auc(calcium[kind], y):.3f} (per mille, median "
            f"with {np.median(with_):.2f}, without {np.median(without):.2f}, without's 90th "
            f"percentile {np.percentile(without, 90):.2f}); exact plaque voxels covered "
            f"{np.mean(plaque_cover[kind]):.3f} (mean of {len(plaque_cover[kind])})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
