"""fVLM vs the CLIP baseline, zero-shot, on synthetic phantoms, at an equal budget in steps.

    python bench/synthetic_zero_shot.py [--cases 240] [--steps 120] [--batch 8] [--lr 1e-4]
        [--seed 0] [--out DIR] [--keep]
        [--normal-wording template|report] [--hu-windows release|four]
        [--variants fvlm,fvlm-no-correction,fvlm-coteach,clip,mask-count]

What it does:

1. Writes ``--cases`` phantoms with :func:`fvlm_pacs.phantoms.write_dataset` (spec
   (48, 96, 128) voxels at (6, 2.5, 2.5) mm, a 288 × 240 × 320 mm chest; on the model's
   3 × 1 × 1 mm grid the anatomy context is about 96 × 165 × 280) into ``--out/data``, or re-uses
   them when ``--out/data/params.json`` says the same cases, seed and spec. Splits them with
   :func:`~fvlm_pacs.model.zeroshot_eval.dataset_split` (70/15/15, ``--seed``) and writes one
   manifest per part (same columns, rows filtered), since the trainer reads a whole manifest.
2. Trains every model variant on the TRAIN manifest only, from scratch, with the same
   :class:`~fvlm_pacs.model.train.TrainConfig` except ``objective``: model ``tiny`` (input
   windows ``--hu-windows``: the release's one, or four standard ones), crop
   (96, 176, 288) (holds the whole context, so ``inside`` is true and every step sees whole
   anatomies), ``--steps`` steps of ``--batch``, warm-up 10 % of the steps, peak ``--lr``
   (default 1e-4, the trainer's and FVLM.md's; cosine to 1e-6), same seed, same preprocessing cache, CPU fp32. The tokenizer is the
   trainer's deterministic WordPiece vocabulary of the train reports, identical for every
   variant (checked: the vocab files are compared). Wall time per variant is measured.
3. Zero-shot on the TEST part only, each finding = (anatomy, positive prompt, negative prompt)
   of ``mappings/findings.yaml``, score = sigmoid((cos_pos − cos_neg) / τ):

   * fVLM variants through the public path: :class:`~fvlm_pacs.model.Predictor` +
     :func:`~fvlm_pacs.model.zeroshot_eval.score_cases`, in ``mode="crops"`` (the release's
     protocol: one ≥ (112, 288, 352) crop per anatomy) and ``mode="single"`` (the whole context
     padded to ≥ (112, 256, 352));
   * ``clip``: the saved files (``model/`` + ``clip_proj.safetensors``) loaded here — there is
     no public scorer for the global head: final-level ViT tokens of the input, mean-pooled,
     ``clip_proj``, L2-normalised (:func:`~fvlm_pacs.model.losses.clip_image_embedding`, as
     in training) against the same prompt embeddings of the same text tower. The input is the
     test case as the trainer's :class:`ManifestDataset` serves it with ``train=False`` (same
     preprocessing, centred crop of the training crop size, no flips), i.e. exactly the
     distribution the head was trained on;
   * ``fvlm@train-grid``: the fVLM anatomy embeddings of that very same input
     (``encode_anatomies`` on the eval item), so fVLM and CLIP see identical pixels and differ
     only in objective and head — the cleanest equal-conditions comparison. The Predictor
     grids differ from the training grid (the tiny model's position embedding is interpolated
     to each grid), which the Predictor columns include.
   * diagnostic columns ``~tmpl`` (``~T`` in the table): the same embeddings scored with the
     anatomy's normal template ("Lung shows no significant abnormalities.", the text every
     normal anatomy is trained on) as the negative prompt instead of "Not X." — a wording the
     from-scratch text tower never saw. Not the protocol; it separates "the image embedding
     carries the finding" from "the negative prompt is meaningless to this text tower";
   * ``mask-count``: no model; score = the number of voxels of the finding's anatomy in the
     label map (the input every anatomy-pooling model also gets). Its AUC is printed as is
     (< 0.5 when the finding shrinks the anatomy) and with the better direction.
4. Prints prompts, budget, wall times, mean AUC per variant (over the findings with both classes
   in the test part), the per-finding AUC table, fVLM − CLIP and fVLM − fVLM-no-correction
   (with a paired bootstrap 95 % interval over test cases), and where the models beat the
   mask-count baseline. Writes ``--out/results.json``. Nothing is asserted.

``fvlm-no-correction`` never pairs two normal samples: the package's
:func:`~fvlm_pacs.model.losses.positive_matrix` pairs identical texts only when one of them is
abnormal, so without the correction normals of different cases are negatives (per-anatomy
InfoNCE, the false-negative problem the correction exists for).

``fvlm-coteach`` is the trainer's co-teaching objective (FVLM.md: two networks, each softening the
other's targets with α = 0.5); only the first network is saved and scored, and its step costs
about two fVLM steps. It is not in the default list because of that cost.
Without ``--keep`` the trained models and caches are deleted at the end (the data is kept for
re-use). Runs on CPU; the default budget was sized for 2 cores (see bench/README.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fvlm_pacs.codes import FindingDefinition, load_findings  # noqa: E402
from fvlm_pacs.evaluation import roc_auc  # noqa: E402
from fvlm_pacs.model import FvlmModel, Predictor, tiny  # noqa: E402
from fvlm_pacs.model.config import RELEASED_HU_WINDOW  # noqa: E402
from fvlm_pacs.model.dataset import ManifestDataset, collate  # noqa: E402
from fvlm_pacs.model.intensity import FOUR_WINDOWS  # noqa: E402
from fvlm_pacs.model.losses import clip_image_embedding  # noqa: E402
from fvlm_pacs.model.predictor import anatomy_table_for  # noqa: E402
from fvlm_pacs.model.train import OBJECTIVES, TrainConfig, train  # noqa: E402
from fvlm_pacs.model.zeroshot_eval import dataset_split, part_manifest, score_cases  # noqa: E402
from fvlm_pacs.phantoms import ANATOMY_LABELS, FINDINGS, PhantomSpec, write_dataset  # noqa: E402
from fvlm_pacs.reports import normal_text  # noqa: E402

SPEC = PhantomSpec(shape=(48, 96, 128), spacing=(6.0, 2.5, 2.5))
CROP = (96, 176, 288)
MODEL_VARIANTS = ("fvlm", "fvlm-no-correction", "fvlm-coteach", "clip")
ALL_VARIANTS = (*MODEL_VARIANTS, "mask-count")
DEFAULT_VARIANTS = ("fvlm", "fvlm-no-correction", "clip", "mask-count")
HU_WINDOWS = {"release": (RELEASED_HU_WINDOW,), "four": FOUR_WINDOWS}


BOOTSTRAP = 500


# -- data ----------------------------------------------------------------------------------
def make_data(out: Path, cases: int, seed: int) -> tuple[Path, float, bool]:
    """``out/data/manifest.csv`` (written or re-used), seconds spent, whether re-used."""
    data = out / "data"
    params = {"cases": cases, "seed": seed, "shape": SPEC.shape, "spacing": SPEC.spacing}
    params = json.loads(json.dumps(params))
    pfile = data / "params.json"
    manifest = data / "manifest.csv"
    if manifest.is_file() and pfile.is_file():
        if json.loads(pfile.read_text(encoding="utf-8")) == params:
            return manifest, 0.0, True
    if data.exists():
        shutil.rmtree(data)
    t0 = time.perf_counter()
    write_dataset(cases, seed, data, spec=SPEC)
    pfile.write_text(json.dumps(params), encoding="utf-8")
    return manifest, time.perf_counter() - t0, False


def test_labels(manifest: Path, ids: tuple[str, ...]) -> dict[str, np.ndarray]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        rows = {r["case_id"]: r for r in csv.DictReader(fh)}
    return {f: np.array([int(rows[c][f]) for c in ids], dtype=np.int8) for f in FINDINGS}


# -- scoring ---------------------------------------------------------------------------------
def prompt_scores(
    v: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, tau: float
) -> torch.Tensor:
    """sigmoid((cos_pos − cos_neg) / τ) for embeddings ``v`` [..., E] and prompts [E]."""
    return torch.sigmoid(((v * pos).sum(-1) - (v * neg).sum(-1)) / tau)


def eval_items(test_manifest: Path, cache: Path, seed: int) -> ManifestDataset:
    return ManifestDataset(test_manifest, crop=CROP, train=False, seed=seed, cache_dir=cache)


def score_train_grid(
    model_dir: Path,
    defs: tuple[FindingDefinition, ...],
    ds: ManifestDataset,
    clip_proj: Path | None,
    negatives: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Scores on the trainer's own eval items: CLIP head when ``clip_proj``, else anatomy
    embeddings. Absent anatomy → NaN (not assessable). ``negatives`` replaces the negative
    prompts (diagnostic only)."""
    model = FvlmModel.from_checkpoint(model_dir, device="cpu").eval()
    proj: torch.nn.Linear | None = None
    if clip_proj is not None:
        from safetensors.torch import load_file

        proj = torch.nn.Linear(model.config.vision.hidden_size, model.config.embed_dim)
        proj.load_state_dict(load_file(str(clip_proj)))
        proj.eval()
    tau = model.temperature
    with torch.inference_mode():
        negs = negatives if negatives is not None else [d.negative for d in defs]
        emb = model.encode_text([d.positive for d in defs] + negs)
    pos, neg = emb[: len(defs)], emb[len(defs) :]
    anat = [model.anatomies.index(d.anatomy) for d in defs]
    rows: list[torch.Tensor] = []
    images: list[torch.Tensor] = []
    for start in range(0, len(ds), 4):
        batch = collate([ds[i] for i in range(start, min(len(ds), start + 4))])
        with torch.inference_mode():
            if proj is not None:
                levels = model.encode_tokens(batch["image"])
                g = clip_image_embedding(levels[-1], proj).float()  # [B, E]
                rows.append(prompt_scores(g[:, None, :], pos, neg, tau))
                images.append(g)
            else:
                v = model.encode_anatomies(batch["image"], batch["labels"])  # [B, K, E]
                rows.append(prompt_scores(v[:, anat, :], pos, neg, tau))
                images.append(v[:, 0])
    if negatives is None:  # collapse check, printed once per model
        img = torch.cat(images)
        img = img[torch.isfinite(img).all(-1)]
        print(
            f"  collapse check {model.name}: mean cosine between the {len(emb)} prompt "
            f"embeddings {float(mean_offdiag(emb)):.4f}, between test-case image embeddings "
            f"({'global' if proj is not None else model.anatomies[0]}) "
            f"{float(mean_offdiag(img)):.4f} (1.0 = collapsed)"
        )
    s = torch.cat(rows).double().numpy()
    return {d.name: s[:, j] for j, d in enumerate(defs)}


def finished_run(run_dir: Path, cfg: TrainConfig) -> tuple[Path, float] | None:
    """(model folder, training seconds) of a kept run that reached ``cfg.steps`` with exactly
    ``cfg``'s settings (as the checkpoint stores them), else None."""
    ckpt_path, model_dir, log_path = (
        run_dir / "checkpoint.pt",
        run_dir / "model",
        run_dir / "train_log.csv",
    )
    if not (ckpt_path.is_file() and model_dir.is_dir() and log_path.is_file()):
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    same = ckpt.get("config") == {k: str(v) for k, v in cfg.to_dict().items()}
    if not same or int(ckpt.get("step", -1)) != cfg.steps:
        return None
    with log_path.open(newline="", encoding="utf-8") as fh:
        last = list(csv.DictReader(fh))[-1]
    return model_dir, float(last["seconds"])


def mean_offdiag(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine over distinct pairs of the rows of ``x`` (L2-normalised)."""
    n = x.shape[0]
    c = x @ x.t()
    return (c.sum() - c.diagonal().sum()) / max(1, n * (n - 1))


def score_mask_count(
    root: Path, ids: tuple[str, ...], defs: tuple[FindingDefinition, ...]
) -> dict[str, np.ndarray]:
    counts = []
    for cid in ids:
        with np.load(root / cid / "case.npz") as data:
            lab = data["labels"]
        counts.append(np.bincount(lab.ravel().astype(np.int64), minlength=5))
    c = np.array(counts, dtype=np.float64)
    return {d.name: c[:, ANATOMY_LABELS[d.anatomy]] for d in defs}


# -- figures ---------------------------------------------------------------------------------
def aucs(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float | None]:
    return {f: roc_auc(scores[f], labels[f]) for f in scores}


def mean_of(values: dict[str, float | None], names: list[str]) -> float:
    vals = [values[n] for n in names if values.get(n) is not None]
    return float(np.mean(vals)) if vals else math.nan


def bootstrap_diff(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    names: list[str],
    seed: int,
) -> tuple[float, float]:
    """Paired bootstrap over test cases: 95 % interval of mean AUC(a) − mean AUC(b); NaN when
    no resample has both classes of any finding."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(labels.values())))
    diffs = []
    for _ in range(BOOTSTRAP):
        idx = rng.integers(0, n, n)
        da, db = [], []
        for f in names:
            x = roc_auc(a[f][idx], labels[f][idx])
            y = roc_auc(b[f][idx], labels[f][idx])
            if x is not None and y is not None:
                da.append(x)
                db.append(y)
        if da:
            diffs.append(float(np.mean(da) - np.mean(db)))
    if not diffs:  # no resample had both classes of any finding (a handful of cases)
        return math.nan, math.nan
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def shorten(column: str) -> str:
    for long, brief in (
        ("fvlm-no-correction", "nocorr"),
        ("fvlm-coteach", "cotch"),
        ("@train-grid", "/grid"),
        ("@", "/"),
        ("~tmpl", "~T"),
        ("mask-count(best dir)", "mask(best)"),
        ("mask-count", "mask"),
    ):
        column = column.replace(long, brief)
    return column


def fmt(v: float | None) -> str:
    return "   -  " if v is None or not math.isfinite(v) else f"{v:6.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=240)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4, help="peak lr, every variant (1e-4: FVLM.md)")
    ap.add_argument(
        "--patch-lr-scale",
        type=float,
        default=0.01,
        help="lr factor of the ViT patch convolution, every variant (see train.param_groups)",
    )
    ap.add_argument(
        "--normal-wording",
        choices=["template", "report"],
        default="template",
        help="normal anatomies' training text: the template (FVLM.md) or the report's own words "
        "(what lets fvlm-no-correction differ from fvlm)",
    )
    ap.add_argument(
        "--hu-windows",
        choices=list(HU_WINDOWS),
        default="release",
        help="the model's input windows, every variant: the release's one [-1150, 350] or four "
        "standard ones (intensity.FOUR_WINDOWS)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fvlm_synth_zs")
    ap.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {','.join(ALL_VARIANTS)} (fvlm-diag: bench-local ablation)",
    )
    ap.add_argument("--keep", action="store_true", help="keep trained models and caches")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="skip training a variant whose kept run (--keep) finished with identical settings",
    )
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {ALL_VARIANTS}")
    logging.basicConfig(level=logging.WARNING)
    t_all = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    manifest, gen_s, reused = make_data(out, args.cases, args.seed)
    root = manifest.parent
    split = dataset_split(manifest, seed=args.seed)
    train_m = part_manifest(manifest, split.train, "train")
    test_m = part_manifest(manifest, split.test, "test")
    labels_all = test_labels(manifest, split.test)
    cache = out / "cache"
    print(
        f"data: {args.cases} phantoms {SPEC.shape} @ {SPEC.spacing} mm in {root} "
        f"({'re-used' if reused else f'written in {gen_s:.1f} s'}); "
        f"split seed {args.seed}: train {len(split.train)}, val {len(split.val)} (unused), "
        f"test {len(split.test)}"
    )

    # findings / prompts: the CT-RATE profile of the released anatomies
    defs = load_findings(anatomy_table_for(tuple(ANATOMY_LABELS)))
    defs = tuple(d for d in defs if d.name in FINDINGS)
    labels = {d.name: labels_all[d.name] for d in defs}
    print("\nprompts (mappings/findings.yaml):")
    for d in defs:
        npos = int(labels[d.name].sum())
        print(f"  {d.name:32s} {d.anatomy:9s} +{d.positive!r:34s} -{d.negative!r:38s} pos {npos}")

    print(
        f"\nnormal anatomies' training text: {args.normal_wording}; "
        f"HU windows: {args.hu_windows} {HU_WINDOWS[args.hu_windows]}; "
        f"co-teaching: {'run' if 'fvlm-coteach' in variants else 'not run'} "
        f"(trainer objectives {OBJECTIVES})"
    )

    scores: dict[str, dict[str, np.ndarray]] = {}
    timing: dict[str, dict[str, float]] = {}
    vocab: dict[str, str] = {}
    ds_eval = eval_items(test_m, cache, args.seed)
    templates = [normal_text(d.anatomy) for d in defs]
    model_cfg = tiny(hu_windows=HU_WINDOWS[args.hu_windows]).to_dict()
    del model_cfg["text"]["vocab_size"]  # the trainer's tokenizer sets it
    for variant in [v for v in variants if v in MODEL_VARIANTS]:
        run_dir = out / "runs" / variant
        cfg = TrainConfig(
            manifest=train_m,
            out_dir=run_dir,
            model="tiny" if args.hu_windows == "release" else model_cfg,
            crop=CROP,
            cache_dir=cache,
            steps=args.steps,
            batch_size=args.batch,
            lr=args.lr,
            patch_lr_scale=args.patch_lr_scale,
            normal_wording=args.normal_wording,
            min_lr=min(1e-6, args.lr),
            warmup_steps=max(1, args.steps // 10),
            seed=args.seed,
            objective=variant,
            log_every=max(1, args.steps // 10),
            checkpoint_every=10**9,
            device="cpu",
            name=f"bench-{variant}",
        )
        done = finished_run(run_dir, cfg) if args.reuse else None
        if done is not None:
            model_dir, train_s = done
            print(f"re-using the finished {variant} run in {run_dir} (same settings)")
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # never resume a stale checkpoint of other settings
            t0 = time.perf_counter()
            model_dir = train(cfg)
            train_s = time.perf_counter() - t0
        vocab[variant] = (run_dir / "tokenizer" / "vocab.txt").read_text(encoding="utf-8")
        with (run_dir / "train_log.csv").open(newline="", encoding="utf-8") as fh:
            last = list(csv.DictReader(fh))[-1]
        timing[variant] = {"train_s": train_s, "final_loss": float(last["loss"])}
        t0 = time.perf_counter()
        if variant == "clip":
            proj = run_dir / "clip_proj.safetensors"
            scores["clip"] = score_train_grid(model_dir, defs, ds_eval, proj)
            scores["clip~tmpl"] = score_train_grid(model_dir, defs, ds_eval, proj, templates)
        else:
            scores[f"{variant}@train-grid"] = score_train_grid(model_dir, defs, ds_eval, None)
            scores[f"{variant}@train-grid~tmpl"] = score_train_grid(
                model_dir, defs, ds_eval, None, templates
            )
            for mode in ("crops", "single"):
                pred = Predictor(model_dir, device="cpu", mode=mode)  # type: ignore[arg-type]
                ls = score_cases(pred, root, split.test)
                for name in labels:  # the predictor reads labels.json: must agree
                    if not np.array_equal(ls.labels[name], labels[name]):
                        raise RuntimeError(f"label mismatch for {name}")
                scores[f"{variant}@{mode}"] = {d.name: ls.scores[d.name] for d in defs}
        timing[variant]["eval_s"] = time.perf_counter() - t0
        print(
            f"trained {variant}: {args.steps} steps x batch {args.batch} in {train_s:.1f} s "
            f"({train_s / args.steps:.2f} s/step), final loss {last['loss']}"
            + (" (both networks summed)" if variant == "fvlm-coteach" else "")
            + ", "
            f"eval {timing[variant]['eval_s']:.1f} s"
        )
    a, b = scores.get("fvlm@train-grid"), scores.get("fvlm-no-correction@train-grid")
    if a is not None and b is not None:
        same = all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
        print(
            f"fvlm vs fvlm-no-correction: scores {'IDENTICAL' if same else 'differ'}"
            + (
                " — every normal anatomy text is the same template, so the identical-text rule "
                "already pairs all normals and the correction changes no target"
                if same
                else ""
            )
        )
    if len(set(vocab.values())) > 1:
        print("WARNING: the variants' tokenizers differ")
    elif vocab:
        size = len(next(iter(vocab.values())).splitlines())
        print(f"tokenizer: identical for all variants ({size} tokens)")
    if "mask-count" in variants:
        scores["mask-count"] = score_mask_count(root, split.test, defs)

    # -- tables --------------------------------------------------------------------------
    table = {v: aucs(s, labels) for v, s in scores.items()}
    names = [d.name for d in defs if all(table[v][d.name] is not None for v in table)]
    cols = list(table)
    if "mask-count" in table:
        table["mask-count(best dir)"] = {
            f: None if a is None else max(a, 1 - a) for f, a in table["mask-count"].items()
        }
        cols.append("mask-count(best dir)")
    means = {v: mean_of(table[v], names) for v in cols}
    print(
        f"\nbudget: {args.steps} steps x batch {args.batch}, lr {args.lr:g} "
        f"(seed {args.seed}, crop {CROP}, "
        f"model tiny, CPU {torch.get_num_threads()} threads); test cases {len(split.test)}; "
        f"mean over {len(names)} findings with both classes in test"
    )
    print("\nmean AUC per variant (~tmpl: diagnostic, negative prompt = normal template):")
    for v in cols:
        print(f"  {v:28s} {fmt(means[v])}")
    short = {c: shorten(c) for c in cols}
    print("\nper-finding AUC (test; /grid = train-grid input, /crops and /single = Predictor):")
    print(f"  {'finding':32s} " + " ".join(f"{short[c][:13]:>13s}" for c in cols))
    for d in defs:
        row = " ".join(f"{fmt(table[c][d.name]):>13s}" for c in cols)
        print(f"  {d.name:32s} {row}")

    diffs: dict[str, Any] = {}
    pairs = []
    for view in ("train-grid", "crops", "single"):
        for other in ("clip", f"fvlm-no-correction@{view}", f"fvlm-coteach@{view}"):
            if f"fvlm@{view}" in scores and other in scores:
                pairs.append((f"fvlm@{view}", other))
    for a, b in (
        ("fvlm@train-grid~tmpl", "clip~tmpl"),
        ("fvlm@train-grid~tmpl", "fvlm-no-correction@train-grid~tmpl"),
    ):
        if a in scores and b in scores:
            pairs.append((a, b))
    if pairs:
        print("\ndifferences of mean AUC (paired bootstrap 95 % interval over test cases):")
    for a, b in pairs:
        lo, hi = bootstrap_diff(scores[a], scores[b], labels, names, args.seed)
        d = means[a] - means[b]
        diffs[f"{a} - {b}"] = {"diff": d, "ci95": [lo, hi]}
        print(f"  {a:22s} - {b:32s} {d:+.3f}  [{lo:+.3f}, {hi:+.3f}]")
    if "clip" in means and "fvlm@train-grid" in means:
        goal = means["fvlm@train-grid"] - means["clip"] >= 0.05
        print(
            f"  goal fVLM >= CLIP + 0.05 (equal input, train-grid): {'MET' if goal else 'NOT MET'}"
        )

    beats: dict[str, list[str]] = {}
    if "mask-count" in table:
        print("\nvs the mask-count baseline (AUC as is):")
        for v in [c for c in cols if not c.startswith("mask-count")]:
            won = [f for f in names if (table[v][f] or 0) > (table["mask-count"][f] or 0)]
            beats[v] = won
            print(f"  {v:28s} beats it on {len(won)}/{len(names)}: {', '.join(won) or '-'}")
        strong = [f for f in names if (table["mask-count(best dir)"][f] or 0) >= 0.7]
        print(f"  findings where mask size alone reaches AUC >= 0.7 (best dir): {strong or '-'}")

    total_s = time.perf_counter() - t_all
    print(f"\ntotal wall time {total_s:.1f} s")
    result = {
        "cases": args.cases,
        "spec": {"shape": SPEC.shape, "spacing": SPEC.spacing},
        "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "crop": CROP,
        "prompts": {d.name: [d.anatomy, d.positive, d.negative] for d in defs},
        "test_positives": {d.name: int(labels[d.name].sum()) for d in defs},
        "normal_wording": args.normal_wording,
        "co_teaching": "fvlm-coteach" in variants,
        "timing": timing,
        "mean_auc": means,
        "mean_over": names,
        "auc": table,
        "differences": diffs,
        "beats_mask_count": beats,
        "total_s": total_s,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"results: {out / 'results.json'}")
    if not args.keep:
        for p in (out / "runs", cache):
            if p.exists():
                shutil.rmtree(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
