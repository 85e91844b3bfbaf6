"""Supervised probe: can an image-encoder design learn a finding at all, given its labels?

    python bench/supervised_probe.py --data DIR [--variant NAME ...] [--findings F ...]
        [--steps 500] [--batch 8] [--split-seed 1] [--seed 0] [--cache DIR] [--threads N]

Zero-shot training asks the encoder to discover a finding from report sentences among sixteen;
when a finding stays at chance there, the first question is whether the encoder *could* carry it.
This probe trains each variant's image encoder and anatomy pooling from scratch together with one
logistic output per finding (read from the finding's anatomy embedding, as zero-shot scoring
reads it), with binary cross-entropy on the phantoms' labels — the easiest signal there is. A
finding that stays near chance here will not appear zero-shot either; one that is learned here
may (the ten-minute gate before a 45-minute demo build). A run whose control finding,
cardiomegaly, stays below 0.8 learned too little to say anything, and the output says so: at
500 steps that happened (bench/README.md).

Every variant is the shipped demo recipe's network (:class:`~fvlm_pacs.model.demo_build.DemoRecipe`)
with its own ``vision`` settings; all see the same batches in the same order (train part of the
``--split-seed`` split, the recipe's training crop and augmentation) and are scored as AUC with a
bootstrap 95 % interval on the validation + test parts. The first variant is the peer: each other
one is printed with its difference per finding and a paired bootstrap interval of the mean
difference. Variants: ``demo`` (the shipped recipe), ``calcium`` (+ the calcium window
[130, 1130] HU as a second input channel). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from synthetic_zero_shot import bootstrap_diff, fmt  # noqa: E402  (bench/)

from fvlm_pacs.evaluation import bootstrap_auc_ci, roc_auc  # noqa: E402
from fvlm_pacs.model.config import RELEASED_HU_WINDOW, ModelConfig  # noqa: E402
from fvlm_pacs.model.dataset import ManifestDataset, collate  # noqa: E402
from fvlm_pacs.model.demo_build import DemoRecipe  # noqa: E402
from fvlm_pacs.model.fvlm import FvlmModel  # noqa: E402
from fvlm_pacs.model.intensity import CALCIUM_WINDOW  # noqa: E402
from fvlm_pacs.model.zeroshot_eval import dataset_split  # noqa: E402
from fvlm_pacs.phantoms import FINDING_ANATOMY, FINDINGS  # noqa: E402

CONTROL = "cardiomegaly"
"""A finding every variant learns (the heart's size): a variant that misses it is broken."""
CONTROL_MIN_AUC = 0.8
DEFAULT_FINDINGS = ("arterial_wall_calcification", "coronary_artery_wall_calcification", CONTROL)
VARIANTS: dict[str, dict[str, Any]] = {
    "demo": {},
    "calcium": {"hu_windows": [RELEASED_HU_WINDOW, CALCIUM_WINDOW], "in_channels": 2},
}
"""``vision`` settings over the demo recipe's, by name."""
WARMUP = 40
LR = 1e-3


def variant_config(name: str) -> ModelConfig:
    """The demo recipe's network with variant ``name``'s vision settings. The probe builds no
    text tower (``with_text=False``); a model config still names a vocabulary size, and 1 is
    the smallest valid one (as ``DemoRecipe`` checks its own config)."""
    data = DemoRecipe().model_config()
    data["text"]["vocab_size"] = 1
    data["vision"].update(VARIANTS[name])
    return ModelConfig.from_dict(data)


@dataclass(frozen=True)
class ProbeResult:
    scores: dict[str, np.ndarray]  # finding -> [N] logits on the evaluation cases
    seconds: float
    final_loss: float


def probe(
    name: str,
    train_set: ManifestDataset,
    eval_set: ManifestDataset,
    train_idx: list[int],
    eval_idx: list[int],
    findings: list[str],
    steps: int,
    batch: int,
    seed: int,
) -> ProbeResult:
    """Train variant ``name`` with BCE heads for ``steps`` steps; logits on ``eval_idx``."""
    cfg = variant_config(name)
    torch.manual_seed(seed)
    model = FvlmModel(cfg, with_text=False)
    heads = torch.nn.Linear(cfg.embed_dim, len(findings))
    anatomy = [cfg.anatomies.index(FINDING_ANATOMY[f]) for f in findings]
    columns = [FINDINGS.index(f) for f in findings]
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.05)
    # warm-up, then cosine from step 0 to 0 at ``steps``: the schedule the figures in
    # bench/README.md were measured with (the trainer's lr_factor starts its cosine after warm-up)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        ),
    )

    def logits(item: dict[str, Any]) -> torch.Tensor:
        """[B, F]: finding j's logistic head on finding j's anatomy embedding."""
        emb = model.encode_anatomies(item["image"], item["labels"].long()).nan_to_num(0.0)
        return (emb[:, anatomy] * heads.weight).sum(-1) + heads.bias

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        pick = rng.choice(train_idx, batch, replace=False)
        item = collate([train_set[(int(i), step)] for i in pick])
        target = item["findings"][:, columns].float()
        loss = F.binary_cross_entropy_with_logits(logits(item), target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(
                f"  {name}: step {step + 1}/{steps} loss {loss.item():.3f} "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    model.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for j in range(0, len(eval_idx), batch):
            out.append(logits(collate([eval_set[int(i)] for i in eval_idx[j : j + batch]])).numpy())
    scores = np.concatenate(out)
    return ProbeResult(
        {f: scores[:, k] for k, f in enumerate(findings)},
        time.perf_counter() - t0,
        float(loss.item()),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="synthetic data set (manifest.csv)")
    ap.add_argument(
        "--variant",
        action="append",
        choices=list(VARIANTS),
        dest="variants",
        help="encoder variants, the first is the peer (default: demo calcium)",
    )
    ap.add_argument("--findings", nargs="+", default=list(DEFAULT_FINDINGS), choices=FINDINGS)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--split-seed", type=int, default=1, help="seed of --data's case split")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    ap.add_argument("--cache", type=Path, help="prepared-volume cache (default: none)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    variants = args.variants or ["demo", "calcium"]
    if args.threads:
        torch.set_num_threads(args.threads)

    manifest = args.data / "manifest.csv"
    recipe = DemoRecipe()
    split = dataset_split(manifest, args.split_seed)
    sets = {
        train: ManifestDataset(
            manifest, crop=recipe.crop, train=train, seed=args.split_seed, cache_dir=args.cache
        )
        for train in (True, False)
    }
    index = {r.case_id: i for i, r in enumerate(sets[True].records)}
    train_idx = [index[c] for c in split.train]
    eval_idx = [index[c] for c in (*split.val, *split.test)]
    columns = [FINDINGS.index(f) for f in args.findings]
    truth = np.array([sets[False].records[i].findings for i in eval_idx])[:, columns]
    labels = {f: truth[:, k].astype(np.int8) for k, f in enumerate(args.findings)}
    print(
        f"{manifest}: train {len(train_idx)}, evaluated {len(eval_idx)} "
        f"(positives: {', '.join(f'{f} {int(labels[f].sum())}' for f in args.findings)}); "
        f"{args.steps} steps x {args.batch}, seed {args.seed}"
    )

    results: dict[str, ProbeResult] = {}
    for name in variants:
        results[name] = probe(
            name,
            sets[True],
            sets[False],
            train_idx,
            eval_idx,
            args.findings,
            args.steps,
            args.batch,
            args.seed,
        )

    peer = variants[0]
    print(f"\nAUC on {len(eval_idx)} cases (95 % bootstrap interval); difference to {peer}")
    print(f"{'finding':36s}" + "".join(f"{v:>26s}" for v in variants))
    for f in args.findings:
        row = f"{f:36s}"
        for v in variants:
            auc = roc_auc(results[v].scores[f], labels[f])
            ci = bootstrap_auc_ci(results[v].scores[f], labels[f])
            lo, hi = ci if ci is not None else (math.nan, math.nan)
            row += f"  {fmt(auc)} [{fmt(lo)},{fmt(hi)}]".rjust(26)
        print(row)
    for v in variants[1:]:
        lo, hi = bootstrap_diff(results[v].scores, results[peer].scores, labels, args.findings, 0)
        diffs = [
            (roc_auc(results[v].scores[f], labels[f]) or math.nan)
            - (roc_auc(results[peer].scores[f], labels[f]) or math.nan)
            for f in args.findings
        ]
        print(
            f"{v} - {peer}: "
            + ", ".join(f"{f} {d:+.3f}" for f, d in zip(args.findings, diffs))
            + f"; mean {np.nanmean(diffs):+.3f} [{lo:+.3f}, {hi:+.3f}]"
        )
    if CONTROL in args.findings:
        for v in variants:
            auc = roc_auc(results[v].scores[CONTROL], labels[CONTROL])
            if auc is None or auc < CONTROL_MIN_AUC:
                print(
                    f"{v}: the control ({CONTROL}) scored {fmt(auc)} < {CONTROL_MIN_AUC}: "
                    "this run learned too little to say anything about the other findings"
                )
    for v in variants:
        r = results[v]
        print(
            f"{v}: {r.seconds:.0f} s ({r.seconds / results[peer].seconds:.2f}x {peer}), "
            f"last loss {r.final_loss:.3f}, threads {torch.get_num_threads()}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
