"""Command line: ``fvlm-pacs serve | worker | run | demo | synth | train | eval | calibrate | db upgrade |
echo | mappings check | model import | model select-prompts | model build-demo | validate``.

The only module that configures logging. Flags override the environment, which overrides the
YAML file given with ``--config``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fvlm_pacs import __version__
from fvlm_pacs.config import Settings, load_settings
from fvlm_pacs.errors import ConfigError, FvlmPacsError

if TYPE_CHECKING:  # the model stack (torch) loads only for the commands that need it
    from fvlm_pacs.model.prompt_selection import PromptChoice
    from fvlm_pacs.model.train import TrainConfig

log = logging.getLogger(__name__)


def _settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML settings file")
    p.add_argument("--data-dir", type=Path, dest="data_dir")
    p.add_argument("--database-url", dest="database_url")
    p.add_argument("--ae-title", dest="ae_title")
    p.add_argument("--dicom-host", dest="dicom_host")
    p.add_argument("--dicom-port", type=int, dest="dicom_port")
    p.add_argument("--http-host", dest="http_host")
    p.add_argument("--http-port", type=int, dest="http_port")
    p.add_argument("--stable-seconds", type=float, dest="stable_seconds")
    p.add_argument("--workers", type=int, dest="workers")
    p.add_argument("--log-level", dest="log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


_OVERRIDES = (
    "data_dir",
    "database_url",
    "ae_title",
    "dicom_host",
    "dicom_port",
    "http_host",
    "http_port",
    "stable_seconds",
    "workers",
    "log_level",
    "model_dir",
)


def _demo_flags(p: argparse.ArgumentParser) -> None:
    from fvlm_pacs import demo  # light: stdlib only at import

    p.add_argument(
        "--dir", type=Path, default=demo.DEFAULT_DIR, dest="demo_dir", help="demo folder"
    )
    p.add_argument("--model", default=demo.DEFAULT_MODEL, help="model folder, or `demo`")
    p.add_argument("--seed", type=int, default=demo.DEFAULT_SEED, help="phantom seed")
    p.add_argument("--exit", action="store_true", dest="exit_when_done", help="stop when done")
    p.add_argument("--timeout", type=float, default=demo.DEFAULT_TIMEOUT, help="seconds to wait")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fvlm-pacs", description=__doc__)
    p.add_argument("--version", action="version", version=f"fvlm-pacs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _settings_flags(sub.add_parser("serve", help="DICOM SCP + HTTP API + sweep + workers"))
    _settings_flags(sub.add_parser("worker", help="a worker pool only (scale out on PostgreSQL)"))
    run = sub.add_parser("run", help="run the pipeline on a folder of DICOM files, no server")
    _settings_flags(run)
    run.add_argument("study_dir", type=Path, help="folder with one study's DICOM files")
    run.add_argument("--model", type=Path, dest="model_dir", help="fVLM model folder")
    run.add_argument("--json", type=Path, dest="json_out", help="write the result JSON here")
    run.add_argument(
        "--out", type=Path, dest="out_dir", help="write the SEG, SR and summary here (with --model)"
    )
    validate = sub.add_parser(
        "validate", help="check SR/SEG/summary files against the AI-result checklist + dciodvfy"
    )
    validate.add_argument("files", type=Path, nargs="+", help="DICOM files written by fvlm-pacs")
    validate.add_argument(
        "--sources", type=Path, help="folder with the source CT series (enables comparisons)"
    )
    validate.add_argument("--no-dciodvfy", action="store_true", help="skip dciodvfy")
    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    _settings_flags(db_sub.add_parser("upgrade", help="apply Alembic migrations"))
    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("aet", help="the peer's (called) AE title")
    echo.add_argument("--calling-aet", default="FVLM_PACS")
    mappings = sub.add_parser("mappings", help="data tables in mappings/")
    mappings_sub = mappings.add_subparsers(dest="mappings_command", required=True)
    check = mappings_sub.add_parser("check", help="validate the tables and print a summary")
    check.add_argument("--dir", type=Path, dest="mappings_dir", help="a mappings/ folder")
    _demo_flags(
        sub.add_parser(
            "demo", help="one synthetic CT study through a real local service, end to end"
        )
    )
    synth = sub.add_parser("synth", help="write synthetic chest CT phantoms with reports")
    synth.add_argument("--n", type=int, default=10, help="number of cases")
    synth.add_argument("--seed", type=int, default=0, help="case i uses seed + i")
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    synth.add_argument("--dicom", action="store_true", help="also write a DICOM CT series")
    synth.add_argument("--seg", action="store_true", help="also write a DICOM SEG of the anatomies")
    for name, text in (
        ("eval", "zero-shot evaluation on a labelled synthetic dataset (test split)"),
        ("calibrate", "per-finding thresholds from the validation split"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--model", type=Path, required=True, help="fVLM model folder")
        cmd.add_argument("--data", type=Path, required=True, help="folder with manifest.csv")
        cmd.add_argument(
            "--split",
            choices=["train", "val", "test", "all"],
            default="test" if name == "eval" else "val",
        )
        cmd.add_argument("--seed", type=int, default=0, help="seed of the case split")
        cmd.add_argument("--mode", choices=["crops", "single"], default="crops")
        cmd.add_argument(
            "--allow-training-cases",
            action="store_true",
            help="use cases the model was trained on (its training_cases.json); refused otherwise",
        )
        cmd.add_argument(
            "--precision",
            choices=["auto", "fp32", "bf16"],
            default="auto",
            help="image encoder arithmetic (auto: bf16 on CUDA, fp32 on CPU)",
        )
        if name == "eval":
            cmd.add_argument("--json", type=Path, required=True, dest="json_out")
            cmd.add_argument("--thresholds", type=Path, help="calibrated thresholds.json")
        else:
            cmd.add_argument("--out", type=Path, help="default: thresholds.json in the model")
    train = sub.add_parser("train", help="pre-train fVLM (or the CLIP baseline) from a manifest")
    train.add_argument("--config", type=Path, required=True, help="training YAML (TrainConfig)")
    model = sub.add_parser("model", help="fVLM checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    imp = model_sub.add_parser(
        "import", help="convert the authors' released checkpoint into our format"
    )
    imp.add_argument("official", type=Path, help="the released .pth file")
    imp.add_argument("--text-model", type=Path, required=True, help="local BERT folder")
    imp.add_argument("--out", type=Path, required=True, help="output model folder")
    imp.add_argument("--name", default="fvlm-ct-rate")
    imp.add_argument("--version", default="1")
    imp.add_argument(
        "--anatomies", help="comma-separated, index order (default lung,heart,esophagus,aorta)"
    )
    select = model_sub.add_parser(
        "select-prompts",
        help="per finding, the negative prompt (and with --positives-from the positive) that "
        "ranks the model's training reports or labelled validation images best (writes its "
        "prompts.yaml)",
    )
    select.add_argument("--model", type=Path, required=True, help="trained fVLM model folder")
    on = select.add_mutually_exclusive_group(required=True)
    on.add_argument(
        "--config",
        type=Path,
        help="on the training reports: the training YAML it was trained with",
    )
    on.add_argument(
        "--data",
        type=Path,
        help="on labelled images: a phantom folder with manifest.csv (its validation split)",
    )
    select.add_argument(
        "--positives-from",
        type=Path,
        metavar="CONFIG",
        help="with --data: also try as each finding's positive prompt the sentences of the "
        "training reports (this training YAML, the model's own) that say the finding",
    )
    select.add_argument("--seed", type=int, default=0, help="seed of the case split (--data)")
    select.add_argument("--dry-run", action="store_true", help="print the choices only")
    demo = model_sub.add_parser(
        "build-demo", help="make the shipped demo model: phantoms, training, calibration, card"
    )
    # defaults: DemoRecipe's, so the shipped model card's rebuild line and this command agree
    demo.add_argument("--cases", type=int, help="synthetic phantoms (all splits)")
    demo.add_argument("--steps", type=int, help="training steps")
    demo.add_argument(
        "--seg-steps",
        type=int,
        help="training steps of the builtin segmentation network (0: ship none)",
    )
    demo.add_argument("--seed", type=int)
    demo.add_argument("--vit-width", type=int, help="hidden size of the ViT (MLP 2x, 4 heads)")
    demo.add_argument(
        "--objective",
        choices=["fvlm", "fvlm-coteach"],
        help="fvlm, or fvlm-coteach (two networks, about twice the time per step)",
    )
    demo.add_argument(
        "--negative-prompts",
        choices=["release", "normal-template", "text-selected", "val-selected"],
        help="the model's negative prompts: the release's 'Not X.' of mappings/findings.yaml, "
        "each anatomy's normal template, or per finding whichever of the two ranks the train "
        "part's reports (text-selected) or the validation images (val-selected) better; all but "
        "release are written to the model's prompts.yaml",
    )
    demo.add_argument(
        "--stem",
        choices=["patch", "hierarchical"],
        help="the ViT's patchify: the release's linear convolution, or a hierarchical stem "
        "(small patchify stages with LayerNorm + GELU, trained at the full learning rate)",
    )
    demo.add_argument(
        "--histograms",
        choices=["on", "off"],
        help="add each anatomy's HU histogram to its embedding (model.histogram_edges = "
        "histogram.HISTOGRAM_EDGES) or not (the release's token pooling alone)",
    )
    demo.add_argument(
        "--histogram-context",
        choices=["on", "off"],
        help="with --histograms on: also the histogram of each anatomy's surroundings "
        "(model.histogram_shell voxels that belong to no anatomy) and its voxel count "
        "(model.histogram_volume); default on, off with --histograms off",
    )
    demo.add_argument(
        "--seg-extra-windows",
        help="the builtin segmentation network's input windows after its first, as LOW:HIGH HU "
        "(comma-separated, or 'none'), e.g. --seg-extra-windows=-100:150 (with '=': the value "
        "starts with '-') to tell pericardial fluid from the heart",
    )
    demo.add_argument(
        "--lesion-counts",
        choices=["on", "off"],
        help="with --histograms on: also each anatomy's counts of round and elongated dense "
        "blobs inside it by size (model.histogram_lesions; nodules, fibrotic bands); default on",
    )
    demo.add_argument(
        "--sentence-keep",
        type=float,
        help="train on random sentence subsets of abnormal anatomy texts: each sentence kept "
        "with this probability (1: the whole text, FVLM.md's training)",
    )
    demo.add_argument(
        "--whole-text-anatomies",
        help="with --sentence-keep under 1: anatomies (comma-separated, or 'none') whose texts "
        "are always whole, e.g. heart, so that cardiomegaly is never trained on a text that "
        "names only the heart's other findings",
    )
    demo.add_argument(
        "--positive-prompts",
        choices=["table", "report-sentences"],
        help="the positive prompts: mappings/findings.yaml's, or per finding that or one of the "
        "train part's report sentences that say the finding, whichever ranks the validation "
        "images better (needs --negative-prompts val-selected)",
    )
    demo.add_argument(
        "--heldout-cases",
        type=int,
        help="independent phantoms (seeds from 100000) the card also reports (0: none)",
    )
    demo.add_argument("--work", type=Path, default=Path("fvlm-demo-build"), help="scratch folder")
    demo.add_argument("--out", type=Path, help="default: the package's models/demo folder")
    return p


def _load(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k, None) for k in _OVERRIDES}
    return load_settings(args.config, **overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO; keep its summaries only.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=args.calling_aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate(args.host, args.port, ae_title=args.aet)
    if not assoc.is_established:
        print(f"association with {args.aet}@{args.host}:{args.port} failed", file=sys.stderr)
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code != 0:
        print(f"C-ECHO failed: status {code}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.aet}@{args.host}:{args.port}: success")
    return 0


def _mappings_check(directory: Path | None) -> int:
    """Validate a mappings/ folder without loading settings: a site checks its tables first."""
    from fvlm_pacs.codes import check_mappings

    try:
        lines = check_mappings(directory)
    except ConfigError as exc:
        print(f"fvlm-pacs: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def _synth(args: argparse.Namespace) -> int:
    """Write phantoms and print how often each finding occurs."""
    import csv

    from fvlm_pacs.phantoms import FINDINGS, write_dataset

    manifest = write_dataset(args.n, args.seed, args.out, dicom=args.dicom, seg=args.seg)
    with manifest.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    print(f"{len(rows)} case(s) written to {args.out} (manifest {manifest.name})")
    for name in FINDINGS:
        print(f"  {name:36s} {sum(int(r[name]) for r in rows)}")
    return 0


def _model_import(args: argparse.Namespace) -> int:
    """Convert and verify a released checkpoint once, so serving never reads the .pth."""
    from fvlm_pacs.model import CheckpointError, import_official

    anatomies = tuple(a.strip() for a in args.anatomies.split(",")) if args.anatomies else None
    try:
        out = import_official(
            args.official, args.text_model, args.out, args.name, args.version, anatomies
        )
    except (CheckpointError, ConfigError, OSError) as exc:
        print(f"fvlm-pacs: {exc}", file=sys.stderr)
        return 2
    print(f"imported {args.official} -> {out}")
    return 0


def _hu_windows(text: str) -> tuple[tuple[float, float], ...]:
    """``LOW:HIGH[,LOW:HIGH…]`` HU windows, or ``none``; :class:`ConfigError` names a bad one."""
    if text.strip() == "none":
        return ()
    out = []
    for part in text.split(","):
        bounds = part.split(":")
        try:
            if len(bounds) != 2:
                raise ValueError
            out.append((float(bounds[0]), float(bounds[1])))
        except ValueError:
            raise ConfigError(f"HU window {part!r}: write LOW:HIGH, e.g. -100:150") from None
    return tuple(out)


def _build_demo(args: argparse.Namespace) -> int:
    """Rebuild the shipped demo model (minutes on a CPU) and print its measured mean AUC."""
    from fvlm_pacs.model.demo_build import EVAL_FILE, HELDOUT_EVAL_FILE, DemoRecipe, build_demo

    keys = (
        "cases",
        "steps",
        "seg_steps",
        "seed",
        "vit_width",
        "objective",
        "negative_prompts",
        "positive_prompts",
        "sentence_keep",
        "heldout_cases",
    )
    given = {k: getattr(args, k) for k in keys}
    if args.stem is not None:
        given["hierarchical_stem"] = args.stem == "hierarchical"
    if args.histograms is not None:
        given["histograms"] = args.histograms == "on"
    if args.histogram_context is not None:
        given["histogram_context"] = args.histogram_context == "on"
    elif args.histograms == "off":  # surroundings are histograms too: off with them
        given["histogram_context"] = False
    if args.lesion_counts is not None:
        given["lesion_counts"] = args.lesion_counts == "on"
    elif args.histograms == "off":  # the counts join the histogram MLP: off with it
        given["lesion_counts"] = False
    if args.positive_prompts is None and args.negative_prompts not in (None, "val-selected"):
        given["positive_prompts"] = "table"  # report sentences are chosen on validation images
    if args.whole_text_anatomies is not None:
        names = args.whole_text_anatomies.split(",")
        given["whole_text_anatomies"] = tuple(
            n.strip() for n in names if n.strip() and n.strip() != "none"
        )
    try:
        if args.seg_extra_windows is not None:
            given["seg_extra_windows"] = _hu_windows(args.seg_extra_windows)
        recipe = DemoRecipe(**{k: v for k, v in given.items() if v is not None})
        out = build_demo(recipe, args.work, args.out)
    except (FvlmPacsError, OSError) as exc:
        print(f"fvlm-pacs: {exc}", file=sys.stderr)
        return 2
    means = [
        f"{what} {json.loads((out / name).read_text(encoding='utf-8')).get('mean_auc')}"
        for what, name in (("test part", EVAL_FILE), ("independent", HELDOUT_EVAL_FILE))
        if (out / name).is_file()
    ]
    print(f"demo model written to {out} (mean zero-shot AUC, {'; '.join(means)})")
    return 0


def _select_prompts(args: argparse.Namespace) -> int:
    """Choose each finding's negative prompt on the training texts (``--config``) or on the
    validation images (``--data``); write ``prompts.yaml``."""
    import shutil
    import tempfile

    from fvlm_pacs.model.checkpoint import resolve_model_path
    from fvlm_pacs.model.model_prompts import apply_model_prompts, default_prompts_path
    from fvlm_pacs.model.predictor import THRESHOLDS_FILE, default_thresholds_path, load_thresholds
    from fvlm_pacs.model.prompt_selection import (
        choices_table,
        model_findings,
        select_on_images,
        write_choices,
    )

    try:
        model_path = resolve_model_path(args.model)
        if args.positives_from is not None and args.data is None:
            raise ConfigError("--positives-from: positives are chosen on images, give --data")
        if args.config is not None:
            where, choices = _choices_on_training_texts(model_path, args.config)
        else:
            where, cases = _validation_cases(model_path, args.data, args.seed)
            positives = (
                _positives_from(model_path, args.positives_from)
                if args.positives_from is not None
                else None
            )
            with tempfile.TemporaryDirectory() as tmp:
                # scored in a copy: the model folder changes only below, and only without
                # --dry-run; its thresholds (made for other prompts) must not load
                work = Path(tmp) / "model"
                shutil.copytree(
                    model_path, work, ignore=shutil.ignore_patterns(THRESHOLDS_FILE, "*.yaml")
                )
                choices, _ = select_on_images(work, args.data, cases, positives=positives)
    except (FvlmPacsError, OSError, ValueError) as exc:
        print(f"fvlm-pacs: {exc}", file=sys.stderr)
        return 2
    print(f"{where}; AUC per negative prompt:\n")
    print(choices_table(choices))
    if args.dry_run:
        return 0
    prompts = default_prompts_path(model_path)
    written = write_choices(prompts, choices)
    print(f"\n{written or 'no prompts file (every finding keeps the table prompts)'}")
    thresholds = default_thresholds_path(model_path)
    if thresholds.is_file():
        try:  # the predictor's own check: thresholds record the prompt pairs they cut
            load_thresholds(thresholds, apply_model_prompts(prompts, model_findings(model_path)))
        except FvlmPacsError as exc:
            print(f"{exc} (the model will not load until then)")
    return 0


def _positives_from(model_path: Path, config: Path) -> dict[str, tuple[str, ...]]:
    """``select-prompts --positives-from``: candidate positives from the model's own training
    reports (any case it was not trained on is refused, as with ``--config``)."""
    from fvlm_pacs.model.prompt_selection import positives_from_training_reports

    cfg, _ = _own_training_config(model_path, config)
    return positives_from_training_reports(model_path, cfg)


def _own_training_config(model_path: Path, config: Path) -> tuple[TrainConfig, int]:
    """The training YAML ``config`` and how many cases it lists, refused unless every one
    trained ``model_path`` (when the model records its cases): validation and test reports stay
    unseen."""
    from fvlm_pacs.model.provenance import TRAINING_CASES_FILE, training_overlap
    from fvlm_pacs.model.train import TrainConfig

    cfg = TrainConfig.from_yaml(config)
    dataset = cfg.dataset(train=False)
    ids = [r.case_id for r in dataset.records]
    if not ids:
        raise ConfigError(f"{cfg.manifest} lists no case")
    seen = training_overlap(model_path, cfg.manifest, ids)
    if (model_path / TRAINING_CASES_FILE).is_file() and len(seen) < len(ids):
        raise ConfigError(
            f"{len(ids) - len(seen)} of {len(ids)} cases of {cfg.manifest} were not used to "
            f"train {model_path}: prompts are chosen on its training reports only, so that "
            "validation and test cases stay unseen"
        )
    return cfg, len(ids)


def _choices_on_training_texts(
    model_path: Path, config: Path
) -> tuple[str, tuple[PromptChoice, ...]]:
    """``select-prompts --config``: the training reports, refused unless they are the model's."""
    from fvlm_pacs.model.prompt_selection import select_on_training_reports

    cfg, cases = _own_training_config(model_path, config)
    choices = select_on_training_reports(model_path, cfg)
    return f"{cases} training reports of {cfg.manifest} (text side)", choices


def _validation_cases(model_path: Path, data: Path, seed: int) -> tuple[str, tuple[str, ...]]:
    """``select-prompts --data``: the validation split, as ``calibrate`` reads it."""
    from fvlm_pacs.model.provenance import training_overlap
    from fvlm_pacs.model.zeroshot_eval import dataset_split

    manifest = data / "manifest.csv"
    if not manifest.is_file():
        raise ConfigError(f"{manifest} does not exist")
    cases = dataset_split(manifest, seed).val
    seen = training_overlap(model_path, manifest, cases)
    if seen:
        raise ConfigError(
            f"{len(seen)} of {len(cases)} validation cases were used to train {model_path} "
            f"(e.g. {seen[0]}): choose prompts on cases it never saw"
        )
    return f"{len(cases)} validation images of {data} (zero-shot)", cases


def _validate(args: argparse.Namespace) -> int:
    """Named checks (and dciodvfy) per file; exit 1 when any file has an error."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from fvlm_pacs.writers.validate import dciodvfy_available, validate_files

    sources = []
    if args.sources is not None:
        for p in sorted(x for x in args.sources.rglob("*") if x.is_file()):
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError):
                continue
            if str(ds.get("Modality", "")) not in ("SR", "SEG", "OT"):
                sources.append(ds)
    use_dciodvfy = not args.no_dciodvfy
    if use_dciodvfy and not dciodvfy_available():
        print("dciodvfy not installed: named checks only", file=sys.stderr)
    reports = validate_files(args.files, sources, dciodvfy=use_dciodvfy)
    for report in reports:
        print("\n".join(report.lines()))
    return 0 if all(r.ok for r in reports) else 1


def _run(
    settings: Settings, study_dir: Path, json_out: Path | None, out_dir: Path | None = None
) -> int:
    """The worker's stages on local files: assembly, findings when a model is set, and the DICOM
    outputs into ``out_dir`` when given."""
    from rich.console import Console
    from rich.table import Table

    from fvlm_pacs.errors import PipelineError
    from fvlm_pacs.pipeline import run_stages
    from fvlm_pacs.service import build_stages

    if not study_dir.is_dir():
        print(f"fvlm-pacs: {study_dir} is not a folder", file=sys.stderr)
        return 2
    paths = sorted(p for p in study_dir.rglob("*") if p.is_file())
    try:
        result = run_stages(build_stages(settings), paths, out_dir, installation=settings.ae_title)
    except ConfigError as exc:
        print(f"fvlm-pacs: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"fvlm-pacs: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    console = Console()
    volume = result["assembly"]["volume"]
    console.print(
        f"series {volume['series_instance_uid']}: {volume['shape']} voxels, "
        f"spacing {volume['spacing_mm']} mm"
    )
    findings = result.get("findings")
    if findings is None:
        console.print("no model_dir set: assembly only")
    else:
        how = result["inference"]
        table = Table(
            title=f"fVLM findings ({result['model']['name']} {result['model']['version']}; "
            f"{how['mode']} mode, {how['crops']} pass(es), {how['precision']} on {how['device']})"
        )
        for column in ("anatomy", "finding", "score", "threshold", "status"):
            table.add_column(column)
        for f in findings:
            score = "—" if f["score"] is None else f"{f['score']:.3f}"
            table.add_row(f["anatomy"], f["finding"], score, f"{f['threshold']:.3f}", f["status"])
        console.print(table)
    console.print(
        "timings: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in result["timings"].items())
    )
    if out_dir is not None and "outputs" not in result:
        console.print("no model_dir set: no DICOM outputs written")
    for output in result.get("outputs", []):
        console.print(f"{output['kind']}: {Path(out_dir or '.') / output['path']}")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"result written to {json_out}")
    return 0


def _zero_shot(args: argparse.Namespace) -> int:
    """``eval``: report on a split with the model's thresholds; ``calibrate``: write them."""
    from fvlm_pacs.evaluation import calibrate, evaluate, write_thresholds
    from fvlm_pacs.model import Predictor
    from fvlm_pacs.model.checkpoint import resolve_model_path
    from fvlm_pacs.model.provenance import training_overlap
    from fvlm_pacs.model.zeroshot_eval import dataset_split, score_cases

    manifest = args.data / "manifest.csv"
    if not manifest.is_file():
        print(f"fvlm-pacs: {manifest} does not exist", file=sys.stderr)
        return 2
    split = dataset_split(manifest, args.seed)
    ids = (
        split.train + split.val + split.test if args.split == "all" else getattr(split, args.split)
    )
    thresholds = getattr(args, "thresholds", None)
    try:
        args.model = resolve_model_path(args.model)
        seen = training_overlap(args.model, manifest, ids)
        if seen and not args.allow_training_cases:
            raise ConfigError(
                f"{len(seen)} of {len(ids)} cases (split {args.split}) were used to train "
                f"{args.model} (e.g. {seen[0]}; phantoms count by seed: `synth --seed S` gives "
                "case i the seed S + i). Use cases it never saw, or pass --allow-training-cases."
            )
        predictor = Predictor(
            args.model, mode=args.mode, precision=args.precision, thresholds_path=thresholds
        )
    except FvlmPacsError as exc:
        print(f"fvlm-pacs: {exc}", file=sys.stderr)
        return 2
    scored = score_cases(predictor, args.data, tuple(ids))
    if args.command == "calibrate":
        out = args.out or args.model / "thresholds.json"
        found = calibrate(scored.scores, scored.labels)
        write_thresholds(out, found, predictor.info.sha256, predictor.prompt_pairs())
        print(f"{len(found)} thresholds from {len(ids)} {args.split} cases written to {out}")
        return 0
    report = evaluate(
        scored.scores, scored.labels, predictor.thresholds, anatomy_of=predictor.anatomy_of()
    )
    doc = report.as_dict()
    doc["inference"] = predictor.arithmetic()
    args.json_out.write_text(json.dumps(doc, indent=2))
    args.json_out.with_suffix(".md").write_text(report.to_markdown())
    report.save_roc_png(args.json_out.with_suffix(".png"))
    print(report.to_markdown())
    return 0


def _train(config_file: Path) -> int:
    """Train from a YAML file and print where the model went."""
    from fvlm_pacs.model.train import TrainConfig, train

    try:
        out = train(TrainConfig.from_yaml(config_file))
    except (ConfigError, OSError) as exc:
        print(f"fvlm-pacs: {exc}", file=sys.stderr)
        return 2
    print(f"model saved to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "echo":
        _configure_logging("WARNING")
        return _echo(args)
    if args.command == "mappings":
        return _mappings_check(args.mappings_dir)
    if args.command == "validate":
        _configure_logging("WARNING")
        return _validate(args)
    if args.command == "synth":
        return _synth(args)
    if args.command == "demo":
        from fvlm_pacs.demo import DemoOptions, run_demo

        _configure_logging("WARNING")
        return run_demo(
            DemoOptions(args.demo_dir, args.model, args.seed, args.exit_when_done, args.timeout)
        )
    if args.command in ("eval", "calibrate"):
        _configure_logging("WARNING")
        return _zero_shot(args)
    if args.command == "train":
        _configure_logging("INFO")
        return _train(args.config)
    if args.command == "model":
        _configure_logging("INFO")
        commands = {"build-demo": _build_demo, "select-prompts": _select_prompts}
        return commands.get(args.model_command, _model_import)(args)
    try:
        settings = _load(args)
    except ConfigError as exc:
        print(f"fvlm-pacs: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    if args.command == "run":
        return _run(settings, args.study_dir, args.json_out, args.out_dir)
    if args.command == "db":
        from fvlm_pacs.db import make_engine, upgrade

        engine = make_engine(settings.resolved_database_url)
        upgrade(engine)
        print(f"database at head: {engine.url.render_as_string(hide_password=True)}")
        return 0
    from fvlm_pacs import service  # heavy imports only for the commands that need them

    try:
        if args.command == "serve":
            service.serve(settings)
        else:
            service.work(settings)
    except OSError as exc:  # a port in use, an unwritable data_dir: say so, no traceback
        print(f"fvlm-pacs: cannot start: {exc}", file=sys.stderr)
        return 1
    except FvlmPacsError as exc:  # a model or provider setting that cannot work
        print(f"fvlm-pacs: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
