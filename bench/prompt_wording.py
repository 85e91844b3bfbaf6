"""Which prompt wording a trained fVLM can be scored with: the release's, or its own normal template.

    python bench/prompt_wording.py --model DIR --data DIR [--heldout DIR] [--seed 0] [--threads N]

``--model``: a model folder of ours (with its text tower, e.g. a training run's ``model/``);
``--data``: the phantoms it was trained on (``manifest.csv`` of ``fvlm-pacs synth`` or a demo
build's ``data/``), split with :func:`~fvlm_pacs.model.zeroshot_eval.dataset_split` and
``--seed`` as the trainer and the demo build split them. Two prompt sets, measured in the same
run on the same weights:

* ``release``: ``mappings/findings.yaml`` as is — "Emphysema." / "Not Emphysema.";
* ``template``: the same positive prompt, and as negative prompt the anatomy's normal template
  ("Lung shows no significant abnormalities.", the text every normal anatomy is trained on).

Two views per set and finding:

1. **text side, train part**: AUC of ``cos(text, positive) − cos(text, negative)`` over the
   anatomy texts the model was trained on, against the finding's label. The ceiling of
   zero-shot scoring with that pair: an image embedding equal to its own report text would
   score exactly this.
2. **image side**: the zero-shot AUC through the public :class:`~fvlm_pacs.model.Predictor`
   (``crops`` mode), the model's own ``prompts.yaml`` and thresholds left out, on the
   validation part — or, with ``--heldout``, on every case of an independent phantom set
   (``write_dataset`` with seeds disjoint from the training data's: case i uses seed + i).
   Never the test part: that one is for the model card. A demo build's validation and test
   parts hold 36 cases each, where one finding with a single positive case swings a mean over
   16 findings by up to 0.06, so a choice between prompt sets wants a larger held-out set.

Prints both per finding and the means. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from synthetic_zero_shot import aucs, bootstrap_diff, fmt, mean_of  # noqa: E402  (bench/)

from fvlm_pacs.codes import FindingDefinition, load_findings  # noqa: E402
from fvlm_pacs.model import FvlmModel, Predictor  # noqa: E402
from fvlm_pacs.model.dataset import ManifestDataset  # noqa: E402
from fvlm_pacs.model.demo_build import AFTER_TRAINING  # noqa: E402
from fvlm_pacs.model.predictor import anatomy_table_for  # noqa: E402
from fvlm_pacs.model.prompt_selection import (  # noqa: E402
    encode_case_texts,
    text_side_auc,
    training_texts,
)
from fvlm_pacs.model.provenance import training_overlap  # noqa: E402
from fvlm_pacs.model.zeroshot_eval import dataset_split, score_cases_shared  # noqa: E402
from fvlm_pacs.reports import normal_text  # noqa: E402


def prompt_sets(model: FvlmModel) -> dict[str, tuple[FindingDefinition, ...]]:
    defs = load_findings(anatomy_table_for(model.anatomies))
    template = tuple(dataclasses.replace(d, negative=normal_text(d.anatomy)) for d in defs)
    return {"release": defs, "template": template}


def text_side(
    model: FvlmModel,
    ds: ManifestDataset,
    rows: list[int],
    sets: dict[str, tuple[FindingDefinition, ...]],
) -> dict[str, dict[str, float | None]]:
    """Per set and finding, the text-side AUC of its pair over ``rows`` (the computation
    ``text-selected`` negative prompts are chosen by, :mod:`fvlm_pacs.model.prompt_selection`)."""
    data = training_texts(ds, rows)
    embedded = encode_case_texts(model.encode_text, data)
    return {
        name: {
            d.name: text_side_auc(model.encode_text, embedded, data, d, [d.negative])[0]
            for d in defs
        }
        for name, defs in sets.items()
    }


def image_side(
    weights: Path,
    root: Path,
    cases: tuple[str, ...],
    sets: dict[str, tuple[FindingDefinition, ...]],
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """({set: scores per finding}, labels per finding) over ``cases``."""
    predictors = [Predictor(weights, device="cpu", findings=defs) for defs in sets.values()]
    scored = score_cases_shared(predictors, root, cases)  # each case encoded once
    scores = {
        name: {d.name: s.scores[d.name] for d in defs}
        for (name, defs), s in zip(sets.items(), scored, strict=True)
    }
    return scores, dict(scored[0].labels)  # the same cases and findings in every set


def mean(values: dict[str, float | None]) -> float:
    return mean_of(values, list(values))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="folder with manifest.csv")
    ap.add_argument(
        "--heldout", type=Path, help="folder with manifest.csv of independent phantoms (image side)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = args.data / "manifest.csv"
    split = dataset_split(manifest, args.seed)
    ds = ManifestDataset(manifest, crop=(96, 176, 288), train=False, seed=args.seed)
    index = {r.case_id: i for i, r in enumerate(ds.records)}
    model = FvlmModel.from_checkpoint(args.model, device="cpu").eval()
    sets = prompt_sets(model)
    text = text_side(model, ds, [index[c] for c in split.train], sets)
    with tempfile.TemporaryDirectory() as tmp:
        # the weights alone: the model's own prompts.yaml and thresholds must not apply
        weights = Path(tmp) / "model"
        shutil.copytree(args.model, weights, ignore=shutil.ignore_patterns(*AFTER_TRAINING))
        if args.heldout is not None:
            held = args.heldout / "manifest.csv"
            held_ds = ManifestDataset(held, crop=(96, 176, 288), train=False)
            cases = tuple(r.case_id for r in held_ds.records)
            seen = training_overlap(args.model, held, cases)
            if seen:
                print(f"{args.model} was trained on {len(seen)} --heldout cases (e.g. {seen[0]})")
                return 2
            scored = image_side(weights, held.parent, cases, sets)
            where = f"held-out {len(cases)} ({held})"
        else:
            scored = image_side(weights, manifest.parent, split.val, sets)
            where = f"val {len(split.val)}"
    scores, labels = scored
    image = {name: aucs(scores[name], labels) for name in sets}
    names = list(labels)
    lo, hi = bootstrap_diff(scores["template"], scores["release"], labels, names, args.seed)
    print(
        f"model {args.model} ({model.name} {model.version}); data {manifest}: train "
        f"{len(split.train)} (text side), {where} (image side)"
    )
    print(f"\n{'finding':36s} {'text release':>12s} {'text template':>13s} "
          f"{'img release':>11s} {'img template':>12s}")  # fmt: skip
    for d in sets["release"]:
        print(
            f"{d.name:36s} {fmt(text['release'][d.name]):>12s} {fmt(text['template'][d.name]):>13s} "
            f"{fmt(image['release'][d.name]):>11s} {fmt(image['template'][d.name]):>12s}"
        )
    print(
        f"{'mean':36s} {mean(text['release']):12.3f} {mean(text['template']):13.3f} "
        f"{mean(image['release']):11.3f} {mean(image['template']):12.3f}"
    )
    print(
        "\ntemplate − release: text side "
        f"{mean(text['template']) - mean(text['release']):+.3f}, image "
        f"{mean(image['template']) - mean(image['release']):+.3f} [{lo:+.3f}, {hi:+.3f}] "
        "(paired bootstrap over cases, 95 %; same weights, same run)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
