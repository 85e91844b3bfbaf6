"""``fvlm-pacs model build-demo``: the one documented command that makes the shipped demo model.

Steps, all local and seeded: synthetic chest phantoms with reports
(:func:`fvlm_pacs.phantoms.write_dataset`) → train/validation/test split → the tiny fVLM trained
on the train part only (:func:`fvlm_pacs.model.train.train`, objective ``fvlm`` or
``fvlm-coteach``) → per-finding
thresholds calibrated on the validation part → zero-shot evaluation on the test part → the
``builtin`` segmentation network trained on the same train part and scored (Dice) on the test part,
shipped in ``segmentation/`` → a model card that states the data (synthetic), the use
(demonstration, never clinical) and the measured metrics, so nobody has to take the demo's scores
on trust. The prompt bank is filled before the folder is shipped, so a demo run never recomputes
prompt embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvlm_pacs.errors import ConfigError
from fvlm_pacs.evaluation import EvalReport, calibrate, evaluate, write_thresholds
from fvlm_pacs.model.checkpoint import demo_model_dir
from fvlm_pacs.model.config import RELEASED_HU_WINDOW, ModelConfig, tiny
from fvlm_pacs.model.dataset import read_synthetic
from fvlm_pacs.model.histogram import HISTOGRAM_EDGES
from fvlm_pacs.model.model_prompts import PROMPTS_FILE, write_model_prompts
from fvlm_pacs.model.predictor import THRESHOLDS_FILE, Predictor
from fvlm_pacs.model.prompt_selection import (
    POSITIVE_CANDIDATES,
    PromptChoice,
    choices_table,
    model_findings,
    positives_from_training_reports,
    select_on_images,
    select_on_training_reports,
    write_choices,
)
from fvlm_pacs.model.prompts import BANK_FILE
from fvlm_pacs.model.train import TrainConfig, train
from fvlm_pacs.model.zeroshot_eval import dataset_split, part_manifest, score_cases
from fvlm_pacs.phantoms import PhantomSpec, write_dataset
from fvlm_pacs.reports import normal_text
from fvlm_pacs.segmentation.builtin import SUBDIR as SEG_SUBDIR
from fvlm_pacs.segmentation.builtin import SegNetConfig
from fvlm_pacs.segmentation.builtin_train import train_builtin

log = logging.getLogger(__name__)

DEMO_NAME = "fvlm-demo"
CARD_FILE = "MODEL_CARD.md"
EVAL_FILE = "eval.json"
HELDOUT_EVAL_FILE = "eval_heldout.json"
AFTER_TRAINING = (
    CARD_FILE,
    EVAL_FILE,
    HELDOUT_EVAL_FILE,
    THRESHOLDS_FILE,
    PROMPTS_FILE,
    BANK_FILE,
    SEG_SUBDIR,
)
"""What :func:`finish_demo` makes: never copied from the trained folder it starts from."""
HELDOUT_SEED = 100_000
"""First phantom seed of the card's independent held-out set (case i: seed + i), far from any
recipe's own block ``[seed, seed + cases)`` — a recipe that would reach it is refused."""
SEG_MIN_LR = 1e-5
"""The builtin network's learning rate decays (cosine) from its peak to this over
``seg_steps``: at 3000 steps its held-out Dice rose from 0.955/0.911/0.648/0.797 (600 steps at a
constant rate, ``fvlm-demo`` 3 and 4) to 0.965/0.948/0.747/0.881 (lung/heart/esophagus/aorta)."""
CONTEXT_SHELL = 2
"""``histogram_shell`` (voxels) of a recipe with ``histogram_context``: 2 mm in-plane and 6 mm
across slices on the model's 3 × 1 × 1 mm grid, the pleural space and pericardium beside the
lung and heart masks (1 and 4 voxels carried the same in ``bench/histogram_probe.py``)."""


NEGATIVE_PROMPTS = ("release", "normal-template", "text-selected", "val-selected")
"""The demo's negative prompts: the release's "Not X." of ``mappings/findings.yaml`` (words the
demo's text tower never saw); each anatomy's normal template ("Lung shows no significant
abnormalities.", what every normal anatomy is trained on); or per finding whichever of the two
orders the train part's report texts better, or ranks the validation part's images better
(:mod:`fvlm_pacs.model.prompt_selection`; the images calibration scores anyway, never the test
part). All but the first are written to the model's ``prompts.yaml``
(:mod:`fvlm_pacs.model.model_prompts`).
Which of the first two works is a coin toss per finding and per training run (a finding's
reports can fall on either side of the pair); the text side predicts it as far as the images lie
near their reports (on the 960-phantom runs, not on 168-phantom ones: ``bench/README.md``)."""
POSITIVE_PROMPTS = ("table", "report-sentences")
"""``table``: the positive prompts of ``mappings/findings.yaml``; ``report-sentences``: per
finding, the table's or one of the training reports' sentences that say the finding, whichever
ranks the validation images best (:func:`~fvlm_pacs.model.prompt_selection.candidate_positives`;
only with ``val-selected`` negatives)."""


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the demo model depends on; stored in its model card.

    The phantom grid (96, 160, 224) at (3, 1.5, 1.5) mm is a 288 × 240 × 336 mm chest whose
    anatomy context fits the training crop on the model's 3 × 1 × 1 mm grid, so every step sees
    whole anatomies, with slices no thicker than the model's (the product's series rules refuse
    slices over 5 mm). ``seg_steps`` is the builtin segmentation network's own budget (0: no
    network is shipped), ``seg_extra_windows`` its input windows after the first (HU; e.g.
    :data:`~fvlm_pacs.segmentation.builtin.SOFT_TISSUE_WINDOW`). ``vit_width`` is the ViT's
    hidden size (MLP 2×, 4 heads) and ``hu_windows`` its input channels, ``hierarchical_stem``
    its patchify (the stem of :data:`~fvlm_pacs.model.config.HMLP_STEM_STRIDES`, else the
    release's convolution, which trains at ``patch_lr_scale``), ``histograms`` whether each
    anatomy's HU histogram
    (:data:`~fvlm_pacs.model.histogram.HISTOGRAM_EDGES`) joins its embedding,
    ``histogram_context`` whether the histogram of its surroundings (:data:`CONTEXT_SHELL`
    voxels) and its volume join too, ``lesion_counts`` whether its counts of round and elongated
    dense blobs by size (:mod:`~fvlm_pacs.model.lesions`) join too; the rest of the network is
    :func:`~fvlm_pacs.model.config.tiny`. ``whole_text_anatomies`` are the anatomies whose texts
    ``sentence_keep`` leaves whole, ``positive_prompts`` one of :data:`POSITIVE_PROMPTS`.

    The defaults are the shipped ``fvlm-demo 7``: 960 phantoms (seeds 1–960), the hierarchical
    stem, anatomy histograms with their surroundings, volumes and lesion counts, each sentence
    of an abnormal anatomy's text kept with p = 0.5 (``sentence_keep``) but the heart's texts
    whole, ``val-selected`` negative prompts and ``report-sentences`` positive prompts, and a
    builtin segmentation network trained 3000 steps with cosine decay (:data:`SEG_MIN_LR`).
    Measured on the card's 200 independent phantoms of this grid (bench/README.md): 0.872 mean
    AUC against 0.848 for ``fvlm-demo 6`` (no lesion counts; CI +0.014…+0.034; lung nodule
    0.59 → 0.80, fibrotic sequela 0.50 → 0.66), 0.833 for ``fvlm-demo 5`` (the heart's texts
    cut too, the table's positives;
    CI +0.009…+0.021; cardiomegaly 0.78 → 0.94), 0.806 for ``fvlm-demo 4`` (whole texts; the
    lung findings 0.60–0.74, 0.78–0.90 with subsets; cardiomegaly 0.95), 0.786 for
    ``fvlm-demo 3`` (whole texts, no surroundings or volume; hiatal hernia 0.58 → 0.85 with
    them) and 0.685 for
    ``fvlm-demo 2`` — no histograms, on phantoms of (48, 96, 128) at (6, 2.5, 2.5) mm, whose
    plaques were a handful of voxels on the model's grid (0.687 for that recipe on this grid);
    the histograms took the calcifications from chance to 0.99–1.00.
    ``fvlm-demo 1`` was 240 coarse phantoms, seed 0, the patch convolution and the release's
    prompts (0.607 on the coarse 200).
    """

    def __post_init__(self) -> None:
        # fail before minutes of phantom writing, not when training starts
        object.__setattr__(self, "whole_text_anatomies", tuple(self.whole_text_anatomies))
        windows = tuple(tuple(float(v) for v in w) for w in self.seg_extra_windows)
        object.__setattr__(self, "seg_extra_windows", windows)
        try:
            SegNetConfig(extra_windows=windows)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"seg_extra_windows: {exc}") from exc
        if self.objective not in ("fvlm", "fvlm-coteach"):
            raise ConfigError(f"objective: fvlm or fvlm-coteach, got {self.objective!r}")
        if self.heldout_cases < 0:
            raise ConfigError(f"heldout_cases: 0 or more, got {self.heldout_cases}")
        if (
            self.heldout_cases
            and self.seed < HELDOUT_SEED + self.heldout_cases
            and (HELDOUT_SEED < self.seed + self.cases)
        ):
            raise ConfigError(
                f"seed: phantoms {self.seed}..{self.seed + self.cases - 1} would overlap the "
                f"held-out block {HELDOUT_SEED}..{HELDOUT_SEED + self.heldout_cases - 1}"
            )
        training_config(self, Path("manifest.csv"), Path("."))  # TrainConfig checks its fields
        if self.negative_prompts not in NEGATIVE_PROMPTS:
            raise ConfigError(
                f"negative_prompts: one of {NEGATIVE_PROMPTS}, got {self.negative_prompts!r}"
            )
        if self.positive_prompts not in POSITIVE_PROMPTS:
            raise ConfigError(
                f"positive_prompts: one of {POSITIVE_PROMPTS}, got {self.positive_prompts!r}"
            )
        if self.positive_prompts != "table" and self.negative_prompts != "val-selected":
            raise ConfigError(
                f"positive_prompts {self.positive_prompts!r} is chosen on the validation images: "
                "it needs negative_prompts val-selected"
            )
        if self.lesion_counts and not self.histograms:
            raise ConfigError("lesion_counts join the anatomy histograms: it needs histograms")
        data = self.model_config()
        data["text"]["vocab_size"] = 1  # any size: only the shapes are checked here
        anatomies = ModelConfig.from_dict(data).anatomies
        unknown = sorted(set(self.whole_text_anatomies) - set(anatomies))
        if unknown:
            raise ConfigError(
                f"whole_text_anatomies: {unknown[0]!r} is not one of {', '.join(anatomies)}"
            )

    def model_config(self) -> dict[str, Any]:
        """The network to train, as a model config without vocabulary size (the trainer fills
        in its tokenizer's)."""
        data = tiny(hu_windows=self.hu_windows, hierarchical_stem=self.hierarchical_stem).to_dict()
        data["vision"].update(hidden_size=self.vit_width, mlp_dim=2 * self.vit_width)
        data["histogram_edges"] = list(HISTOGRAM_EDGES if self.histograms else ())
        data["histogram_shell"] = CONTEXT_SHELL if self.histogram_context else 0
        data["histogram_volume"] = self.histogram_context
        data["histogram_lesions"] = self.lesion_counts
        del data["text"]["vocab_size"]
        return data

    cases: int = 960
    seed: int = 1
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    patch_lr_scale: float = 0.01
    shape: tuple[int, int, int] = (96, 160, 224)
    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)
    crop: tuple[int, int, int] = (96, 176, 288)
    seg_steps: int = 3000
    seg_extra_windows: tuple[tuple[float, float], ...] = ()
    vit_width: int = 64
    hu_windows: tuple[tuple[float, float], ...] = (RELEASED_HU_WINDOW,)
    hierarchical_stem: bool = True
    histograms: bool = True
    histogram_context: bool = True
    lesion_counts: bool = True
    sentence_keep: float = 0.5
    whole_text_anatomies: tuple[str, ...] = ("heart",)
    objective: str = "fvlm"
    negative_prompts: str = "val-selected"
    positive_prompts: str = "report-sentences"
    heldout_cases: int = 200
    version: str = "7"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def build_demo(
    recipe: DemoRecipe, work_dir: Path, out_dir: Path | None = None, *, device: str = "cpu"
) -> Path:
    """Make the demo model in ``out_dir`` (default: the package's ``models/demo``); returns it.

    ``work_dir`` holds the phantoms, the training run and its cache; it can be deleted after.
    The output folder is replaced only once everything succeeded.
    """
    out = out_dir or demo_model_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spec = PhantomSpec(shape=recipe.shape, spacing=recipe.spacing)
    manifest = write_dataset(recipe.cases, recipe.seed, work_dir / "data", spec=spec)
    split = dataset_split(manifest, recipe.seed)
    train_manifest = part_manifest(manifest, split.train, "train")
    data_s = time.perf_counter() - started

    t0 = time.perf_counter()
    trained = train(training_config(recipe, train_manifest, work_dir, device))
    train_s = time.perf_counter() - t0
    timings = {"data_s": data_s, "train_s": train_s}
    return finish_demo(recipe, trained, manifest, work_dir, out, timings, device=device)


def training_config(
    recipe: DemoRecipe, train_manifest: Path, work_dir: Path, device: str = "cpu"
) -> TrainConfig:
    """The recipe's training run on the train part of its phantoms."""
    return TrainConfig(
        manifest=train_manifest,
        out_dir=work_dir / "run",
        model=recipe.model_config(),
        crop=recipe.crop,
        cache_dir=work_dir / "cache",
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        patch_lr_scale=recipe.patch_lr_scale,
        min_lr=min(1e-6, recipe.lr),
        warmup_steps=max(1, recipe.steps // 10),
        seed=recipe.seed,
        objective=recipe.objective,
        log_every=max(1, recipe.steps // 20),
        checkpoint_every=10**9,
        device=device,
        name=DEMO_NAME,
        version=recipe.version,
        sentence_keep=recipe.sentence_keep,
        whole_text_anatomies=recipe.whole_text_anatomies,
    )


def finish_demo(
    recipe: DemoRecipe,
    trained: Path,
    manifest: Path,
    work_dir: Path,
    out: Path,
    timings: dict[str, float],
    *,
    device: str = "cpu",
) -> Path:
    """Everything after training: the model's prompts, thresholds calibrated on the validation
    part, zero-shot evaluation on the test part, the segmentation network, the card; ``out`` is
    replaced only once all of it succeeded.

    Separate from :func:`build_demo` so that a change after training (e.g. the prompts) can be
    applied to shipped weights by the same code a full rebuild runs; ``trained`` is the trained
    model folder and ``manifest`` the recipe's phantoms.
    """
    split = dataset_split(manifest, recipe.seed)
    train_manifest = part_manifest(manifest, split.train, "train")
    staging = work_dir / "model"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(trained, staging, ignore=shutil.ignore_patterns(*AFTER_TRAINING))
    training = training_config(recipe, train_manifest, work_dir, device)
    choices = write_demo_prompts(recipe, staging, training)
    t0 = time.perf_counter()
    root = manifest.parent
    if recipe.negative_prompts == "val-selected":
        positives = (
            positives_from_training_reports(staging, training)
            if recipe.positive_prompts == "report-sentences"
            else None
        )
        choices, val = select_on_images(staging, root, split.val, device, positives)
        predictor = Predictor(staging, device=device)
    else:
        predictor = Predictor(staging, device=device)
        val = score_cases(predictor, root, split.val)
    thresholds = calibrate(val.scores, val.labels)
    write_thresholds(
        staging / THRESHOLDS_FILE, thresholds, predictor.info.sha256, predictor.prompt_pairs()
    )
    predictor = Predictor(staging, device=device)  # reload: the calibrated thresholds apply
    test = score_cases(predictor, root, split.test)
    report = evaluate(
        test.scores, test.labels, predictor.thresholds, anatomy_of=predictor.anatomy_of()
    )
    (staging / EVAL_FILE).write_text(report.to_json() + "\n", encoding="utf-8")
    heldout = None
    if recipe.heldout_cases:
        spec = PhantomSpec(shape=recipe.shape, spacing=recipe.spacing)
        held = write_dataset(recipe.heldout_cases, HELDOUT_SEED, work_dir / "heldout", spec=spec)
        cases = tuple(r.case_id for r in read_synthetic(held))
        scored = score_cases(predictor, held.parent, cases)
        heldout = evaluate(
            scored.scores, scored.labels, predictor.thresholds, anatomy_of=predictor.anatomy_of()
        )
        (staging / HELDOUT_EVAL_FILE).write_text(heldout.to_json() + "\n", encoding="utf-8")
    timings = {**timings, "eval_s": time.perf_counter() - t0}
    seg_metrics: dict[str, Any] | None = None
    if recipe.seg_steps > 0:
        t0 = time.perf_counter()
        seg = train_builtin(
            train_manifest,
            work_dir / "segmentation",
            steps=recipe.seg_steps,
            seed=recipe.seed,
            min_lr=SEG_MIN_LR,
            test_cases=[root / cid for cid in split.test],
            device=device,
            version=recipe.version,
            log_every=max(1, recipe.seg_steps // 10),
            config=SegNetConfig(extra_windows=recipe.seg_extra_windows),
        )
        timings["seg_s"] = time.perf_counter() - t0
        shutil.copytree(seg.out_dir, staging / SEG_SUBDIR)
        seg_metrics = seg.metrics
    (staging / CARD_FILE).write_text(
        model_card(
            recipe,
            report,
            split_sizes=split,
            timings=timings,
            segmentation=seg_metrics,
            prompt_choices=choices,
            heldout=heldout,
        ),
        encoding="utf-8",
    )
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(staging, out)
    log.info("demo model written to %s (mean AUC %s)", out, report.mean_auc)
    return out


def write_demo_prompts(
    recipe: DemoRecipe, model_dir: Path, training: TrainConfig
) -> tuple[PromptChoice, ...]:
    """The model's own negative prompts (``prompts.yaml``) when the recipe asks for them;
    ``training`` is the run that made ``model_dir`` (its texts decide ``text-selected``).
    Returns the per-finding choices of ``text-selected`` (empty otherwise; ``val-selected`` is
    :func:`~fvlm_pacs.model.prompt_selection.select_on_images`, which needs the validation
    images)."""
    if recipe.negative_prompts in ("release", "val-selected"):
        return ()
    if recipe.negative_prompts == "normal-template":
        prompts = {f.name: {"negative": normal_text(f.anatomy)} for f in model_findings(model_dir)}
        write_model_prompts(model_dir / PROMPTS_FILE, prompts)
        return ()
    choices = select_on_training_reports(model_dir, training)
    write_choices(model_dir / PROMPTS_FILE, choices)
    return choices


def rebuild_command(recipe: DemoRecipe) -> str:
    """The ``build-demo`` command line that rebuilds ``recipe`` (the card's "Rebuild"): every
    option the CLI has, so that it stays right when a default changes."""

    def on(flag: bool) -> str:
        return "on" if flag else "off"

    words = [
        "fvlm-pacs model build-demo",
        f"--cases {recipe.cases}",
        f"--steps {recipe.steps}",
        f"--seg-steps {recipe.seg_steps}",
        f"--seed {recipe.seed}",
        f"--vit-width {recipe.vit_width}",
        f"--objective {recipe.objective}",
        f"--negative-prompts {recipe.negative_prompts}",
        f"--positive-prompts {recipe.positive_prompts}",
        f"--stem {'hierarchical' if recipe.hierarchical_stem else 'patch'}",
        f"--histograms {on(recipe.histograms)}",
        f"--histogram-context {on(recipe.histogram_context)}",
        f"--lesion-counts {on(recipe.lesion_counts)}",
        f"--sentence-keep {recipe.sentence_keep:g}",
    ]
    if recipe.seg_extra_windows:  # '=': a window's low end starts with '-'
        windows = ",".join(f"{lo:g}:{hi:g}" for lo, hi in recipe.seg_extra_windows)
        words.append(f"--seg-extra-windows={windows}")
    words.append(f"--whole-text-anatomies {','.join(recipe.whole_text_anatomies) or 'none'}")
    words.append(f"--heldout-cases {recipe.heldout_cases}")
    return " ".join(words)


def model_card(
    recipe: DemoRecipe,
    report: EvalReport,
    *,
    split_sizes: Any,
    timings: dict[str, float],
    segmentation: dict[str, Any] | None = None,
    prompt_choices: Sequence[PromptChoice] = (),
    heldout: EvalReport | None = None,
) -> str:
    """The model card: what the model is, what it was trained on, how well it does, and how to
    rebuild it. The first line after the title is the caveat ``fvlm-pacs demo`` prints.
    ``segmentation`` is the builtin network's ``metrics.json`` (None: none shipped);
    ``prompt_choices`` the per-finding choices of ``text-selected`` negative prompts;
    ``heldout`` the evaluation on the independent phantoms of :data:`HELDOUT_SEED`."""
    mean = report.mean_auc
    mean_txt = "n/a" if mean is None else f"{mean:.3f}"
    held_mean = None if heldout is None else heldout.mean_auc
    held_txt = "n/a" if held_mean is None else f"{held_mean:.3f}"
    headline = (
        f"held-out synthetic phantoms {mean_txt}"
        if heldout is None
        else f"{recipe.heldout_cases} independent synthetic phantoms {held_txt} (test part "
        f"{mean_txt})"
    )
    lines = [
        f"# Model card: {DEMO_NAME} {recipe.version}",
        "",
        f"caveat: synthetic training data only, NOT for clinical use; mean zero-shot AUC on "
        f"{headline}.",
        "",
        "## What it is",
        "",
        f"A tiny fVLM (ViT 4 blocks × {recipe.vit_width}, BERT 2 layers × 32 with a WordPiece "
        "vocabulary built from the synthetic reports, 16-d joint space, anatomies "
        "lung/heart/esophagus/aorta; input channels: the HU windows "
        + ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in recipe.hu_windows)
        + (
            "; each anatomy's HU histogram, bins at "
            + ", ".join(f"{e:g}" for e in HISTOGRAM_EDGES)
            + " HU"
            + (
                f", with that of its surroundings ({CONTEXT_SHELL} voxels) and its volume,"
                if recipe.histogram_context
                else ","
            )
            + (
                " its counts of round and elongated dense blobs by size (nodules, fibrotic bands),"
                if recipe.lesion_counts
                else ""
            )
            + " joins its pooled tokens"
            if recipe.histograms
            else ""
        )
        + ") trained from scratch with the fVLM objective (normal-sample correction on, a "
        "no-op here: every normal anatomy trains on its one template text, bench/README.md"
        + (
            "; co-teaching with a second network, the first is shipped"
            if recipe.objective == "fvlm-coteach"
            else ""
        )
        + "). It exists so "
        "that the whole product (DICOM in, findings, triage, SR/SEG out, worklist) can be shown "
        "and tested on any machine without downloading weights.",
        "",
        "## Data",
        "",
        f"{recipe.cases} synthetic chest CT phantoms (`fvlm_pacs.phantoms`, seed {recipe.seed}, "
        f"grid {list(recipe.shape)} at {list(recipe.spacing)} mm) with CT-RATE-style reports; "
        f"split train/val/test = {len(split_sizes.train)}/{len(split_sizes.val)}/"
        f"{len(split_sizes.test)} cases. No patient data.",
        "",
        "## Training",
        "",
        f"{recipe.steps} steps × batch {recipe.batch_size}, AdamW peak lr {recipe.lr} "
        + (
            "(every layer, the hierarchical stem included)"
            if recipe.hierarchical_stem
            else f"(patch convolution × {recipe.patch_lr_scale})"
        )
        + ", warm-up "
        f"10 %, cosine decay, crop {list(recipe.crop)}, flips p = 0.2"
        + (
            f", each sentence of an abnormal anatomy's text kept with p = {recipe.sentence_keep:g}"
            + (
                f" ({', '.join(recipe.whole_text_anatomies)}: whole texts)"
                if recipe.whole_text_anatomies
                else ""
            )
            if recipe.sentence_keep < 1.0
            else ""
        )
        + f", CPU fp32, seed {recipe.seed}. Wall time: data {timings['data_s']:.0f} s, training "
        f"{timings['train_s']:.0f} s, calibration + evaluation {timings['eval_s']:.0f} s.",
        "",
        "## Thresholds",
        "",
        "Per-finding thresholds in `thresholds.json` were calibrated on the validation part "
        "(closest ROC point to (0, 1)); the test part below was never used for them.",
        "",
        "## Zero-shot results on the held-out test part",
        "",
        f"Mean AUC {mean_txt} (findings with both classes in the test part). Prompts: "
        + prompts_wording(recipe.negative_prompts, recipe.positive_prompts),
        "",
        *prompt_choices_section(prompt_choices, recipe.negative_prompts),
        report.to_markdown(),
        "",
        *heldout_section(recipe, heldout),
        *segmentation_section(segmentation, timings),
        "## Known limits",
        "",
        limits(
            mean if heldout is None else held_mean,
            hierarchical_stem=recipe.hierarchical_stem,
            histograms=recipe.histograms,
            histogram_context=recipe.histogram_context,
        ),
        "",
        "## Rebuild",
        "",
        "```",
        rebuild_command(recipe),
        "```",
        "",
        "Seeded, but float sums depend on the number of torch threads (training runs on 1 and 2 "
        "threads part after a few hundred steps): a rebuild repeats the recipe, not these exact "
        "weights.",
        "",
    ]
    return "\n".join(lines)


def heldout_section(recipe: DemoRecipe, report: EvalReport | None) -> list[str]:
    """The card's results on phantoms the build never split, trained or calibrated on."""
    if report is None:
        return []
    mean = "n/a" if report.mean_auc is None else f"{report.mean_auc:.3f}"
    return [
        "## Zero-shot results on independent held-out phantoms",
        "",
        f"{recipe.heldout_cases} phantoms of the same grid with seeds {HELDOUT_SEED}–"
        f"{HELDOUT_SEED + recipe.heldout_cases - 1} (the build's own: {recipe.seed}–"
        f"{recipe.seed + recipe.cases - 1}), same prompts and thresholds: mean AUC {mean}. "
        "The test part above holds few cases per finding (one case can move the mean by "
        "several hundredths); this set is the one to compare builds on.",
        "",
        report.to_markdown(),
        "",
    ]


def prompts_wording(negative_prompts: str, positive_prompts: str = "table") -> str:
    """The card's sentence on which prompts the results below were scored with."""
    if negative_prompts == "release":
        return "the positive/negative pairs of `mappings/findings.yaml`."
    lead = (
        'the positive prompts of `mappings/findings.yaml` ("Emphysema."); as negative prompt '
        if positive_prompts == "table"
        else 'as positive prompt per finding the one of `mappings/findings.yaml` ("Emphysema.") '
        "or a sentence of the train part's reports that says the finding (up to "
        f"{POSITIVE_CANDIDATES}, those most used), whichever ranks the validation part's "
        "images better with the negative chosen first; as negative prompt "
    )
    template = (
        'each anatomy\'s normal template ("Lung shows no significant abnormalities.", the '
        "text every normal anatomy was trained on)"
    )
    if negative_prompts == "normal-template":
        return lead + template + ", in `prompts.yaml`."
    which = (
        "the train part's report texts"
        if negative_prompts == "text-selected"
        else "the validation part's images"
    )
    return (
        lead
        + 'per finding the table\'s ("Not Emphysema.") or '
        + template
        + f", whichever ranks {which} better (table below), in `prompts.yaml`."
    )


def prompt_choices_section(
    choices: Sequence[PromptChoice], negative_prompts: str = "text-selected"
) -> list[str]:
    """The per-finding negative prompts and the AUCs they were chosen by."""
    if not choices:
        return []
    how = (
        "Negative prompts, chosen on the train part's anatomy texts and labels only (no image, "
        "no validation or test case): the AUC of cos(text, positive) − cos(text, negative) "
        "over those texts, per candidate (`fvlm_pacs.model.prompt_selection`)."
        if negative_prompts == "text-selected"
        else "Negative prompts, chosen on the validation part's images (the cases the "
        "thresholds are calibrated on; never the test part or the independent phantoms): the "
        "zero-shot AUC with each candidate (`fvlm_pacs.model.prompt_selection`)."
        + (
            " Then, with the chosen negative, the positive prompts on the same images."
            if any(c.positives for c in choices)
            else ""
        )
    )
    return [
        how,
        "",
        choices_table(choices),
        "",
    ]


def segmentation_section(metrics: dict[str, Any] | None, timings: dict[str, float]) -> list[str]:
    """The card's "Segmentation network" section: what the builtin network is and its measured
    Dice per anatomy on the held-out test part (on each case's own grid, as a study gets it)."""
    head = ["## Segmentation network", ""]
    if metrics is None:
        return [*head, "None shipped with this build (`--seg-steps 0`).", ""]
    net = metrics.get("network", {})
    test = metrics.get("test") or {}
    dice, raw = test.get("dice") or {}, test.get("dice_raw") or {}
    nearest = test.get("dice_nearest") or {}  # networks measured before linear upsampling: none

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{float(value):.3f}"

    rows = [
        f"| {name} | {fmt(dice.get(name))} | {fmt(raw.get(name))} | {fmt(nearest.get(name))} |"
        for name in net.get("anatomies", dice.keys())
    ]
    return [
        *head,
        "`segmentation/` holds the `builtin` segmentation provider's network "
        "(`segmentation_provider: builtin`): a MONAI 3-D U-Net (channels "
        f"{net.get('channels')}, {metrics.get('parameters')} parameters, "
        f"{metrics.get('weights_bytes', 0) / 1e6:.1f} MB) on a "
        f"{net.get('spacing_mm')} mm grid in orientation {net.get('orientation')}, HU window "
        f"{net.get('hu_window')}"
        + "".join(f" and {list(w)}" for w in net.get("extra_windows") or ())
        + f", trained on the same {metrics.get('train_cases')} train phantoms "
        f"for {metrics.get('steps')} steps × batch {metrics.get('batch_size')} (Adam lr "
        f"{metrics.get('lr')}"
        + ("" if metrics.get("min_lr") is None else f", cosine decay to {metrics['min_lr']:g}")
        + f", Dice + cross-entropy, crops {net.get('roi')} shifted within an air "
        "margin, rotations ±0.15 rad, scaling ±10 %, left-right flips); "
        f"{metrics.get('seconds_per_step')} s per step, {timings.get('seg_s', 0.0):.0f} s in all "
        "with evaluation.",
        "",
        f"Dice on the {test.get('cases', 0)} held-out test phantoms, each segmented on its own "
        "grid and compared with its exact labels (mean "
        f"{fmt(test.get('mean_dice'))}); 'raw' is before dropping small components, 'nearest' "
        "with the working grid's labels copied to the CT grid instead of its probabilities "
        f"interpolated (the provider's upsampling: {net.get('upsampling')}). "
        "Phantoms only: on real CT expect much less, use `dicom-seg` or `totalsegmentator` there.",
        "",
        "| anatomy | Dice | Dice raw | Dice nearest |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def limits(
    mean_auc: float | None,
    *,
    hierarchical_stem: bool = False,
    histograms: bool = False,
    histogram_context: bool = False,
) -> str:
    """The model card's warning, worded from the measured mean AUC rather than hoped for."""
    base = "Trained from scratch on a CPU (wall time above), on phantoms, with a small batch; " + (
        "the ViT patchifies with a hierarchical stem of our own, so the released fVLM "
        "checkpoint's patch convolution cannot be loaded into it. "
        if hierarchical_stem
        else "the ViT's patch convolution learns 100x slower than the rest (patch_lr_scale), "
        "without which from-scratch training collapses every anatomy embedding to one vector. "
    )
    if histograms:
        base += (
            "Its anatomy histograms count the HU inside each mask"
            + (", and beside it, and its size" if histogram_context else "")
            + ": a mask that strays into bone or fluid changes them, so its findings depend on "
            "the segmentation more than a token-only model's (the results above use the "
            "phantoms' exact masks). "
        )
    if mean_auc is None or mean_auc < 0.6:
        return base + (
            "Measured mean AUC is close to chance: treat every finding this model reports as a "
            "demonstration of the data path (DICOM in, SR/SEG out, triage, worklist), not of "
            "detection."
        )
    return base + (
        "Measured mean AUC is above chance on synthetic phantoms, which says nothing "
        "about real CT: use it only to demonstrate the product."
    )
