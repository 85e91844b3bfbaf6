"""fVLM inference cost on this machine: preprocessing and the anatomy encoder, with a peer.

    python bench/inference.py [--repeats 3] [--threads N] [--skip-monai]

Prints, for a 512×512×300 CT study (0.7 mm pixels, 1 mm slices) with four anatomies:

* preprocessing (orientation, 3×1×1 mm resampling, window, crops) wall time;
* the image path at ViT-B dimensions with random weights (``encode_anatomies`` on one
  (112, 288, 352) crop = 1,386 tokens): wall time in fp32 and in bf16 autocast, analytic FLOPs
  and achieved FLOP/s;
* the same ViT-B forward in MONAI's ``monai.networks.nets.ViT`` (the reference implementation
  the checkpoint's key names come from), measured in the same run, and the ratio;
* whole studies through :class:`~fvlm_pacs.model.predictor.Predictor.run` (preprocess, encode,
  score) for a ViT-B model with random weights and for the shipped demo model, in ``crops`` and
  ``single`` mode, fp32 and bf16, with the largest score difference bf16 − fp32 per model;
* peak RSS of the process.

Assembly (reading the DICOM files) is measured by ``ingest.py``'s peer, segmentation by
``builtin_segmentation.py``; both are independent of the model.

Nothing is asserted; figures only. Runs on the CPU unless CUDA is available.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fvlm_pacs.domain import Volume  # noqa: E402 (after sys.path)
from fvlm_pacs.model import FvlmModel, vit_b  # noqa: E402
from fvlm_pacs.model.histogram import HISTOGRAM_EDGES, anatomy_histograms  # noqa: E402
from fvlm_pacs.model.lesions import anatomy_lesions  # noqa: E402
from fvlm_pacs.model.predictor import cast_linear_weights  # noqa: E402
from fvlm_pacs.model.preprocess import anatomy_crops, context_crop, to_model_grid  # noqa: E402

CROP = (112, 288, 352)
SHELL = 2
"""Shell width (voxels) timed for the anatomy surroundings: the one measured in bench/README.md."""


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` runs after one warm-up, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def study() -> tuple[Volume, np.ndarray]:
    """A 300 × 512 × 512 HU volume with four box anatomies (chest-sized extents)."""
    shape = (300, 512, 512)
    affine = np.eye(4)
    affine[:3, 0] = (0, 0, 1.0)
    affine[:3, 1] = (0, 0.7, 0)
    affine[:3, 2] = (0.7, 0, 0)
    affine[:3, 3] = (-179, -179, -150)
    rng = np.random.default_rng(0)
    hu = rng.normal(-300, 200, size=shape).astype(np.float32)
    labels = np.zeros(shape, np.int16)
    labels[20:260, 60:420, 40:470] = 1  # lung
    labels[120:220, 150:330, 180:380] = 2  # heart
    labels[40:240, 300:340, 240:280] = 3  # esophagus
    labels[30:250, 260:320, 280:340] = 4  # aorta
    vol = Volume(
        voxels=hd.Volume(hu, affine, "PATIENT", frame_of_reference_uid="1.2.3"),
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        source_instances=tuple(str(i) for i in range(shape[0])),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )
    return vol, labels


def lesion_cost(repeats: int, device: torch.device) -> None:
    """Lesion counts (``model.histogram_lesions``) on a phantom's single-pass context crop
    against the shipped demo model's whole encode of the same crop (its histograms included):
    what the option adds per image. A phantom, not :func:`study`'s noise, because the cost
    grows with the number of dense components and noise has thousands."""
    from fvlm_pacs.model.checkpoint import demo_model_dir
    from fvlm_pacs.model.preprocess import MODEL_SPACING_MM
    from fvlm_pacs.phantoms import make_case

    case = make_case(7, force={"lung_nodule": True, "pulmonary_fibrotic_sequela": True})
    vol = Volume(
        voxels=hd.Volume(case.hu.astype(np.float32), case.affine, "PATIENT"),
        study_instance_uid="1.2",
        series_instance_uid="1.2.3",
        source_instances=(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    )
    crop = context_crop(to_model_grid(vol, case.labels, 4))
    image = torch.from_numpy(crop.image)[None, None].to(device)
    labels = torch.from_numpy(crop.labels.astype(np.int64))[None].to(device)
    demo = FvlmModel.from_checkpoint(demo_model_dir(), device=device, with_text=False)

    def encode() -> None:
        with torch.inference_mode():
            demo.encode_anatomies(image, labels)

    encode_s = timed(encode, repeats)
    lesion_s = timed(lambda: anatomy_lesions(image, labels, 4, MODEL_SPACING_MM), repeats)
    print(
        f"lesion counts (model.histogram_lesions) on a phantom's context crop {crop.shape}: "
        f"{lesion_s:.3f} s, {lesion_s / encode_s:.2f}× the demo model's encode of it "
        f"({encode_s:.3f} s)"
    )


def vit_flops(
    d: int, h: int, w: int, patch: tuple[int, int, int], c: int, layers: int, mlp: int
) -> float:
    """Multiply-adds × 2 of the ViT forward (patch embedding, attention, MLP)."""
    n = (d // patch[0]) * (h // patch[1]) * (w // patch[2])
    embed = 2 * n * c * patch[0] * patch[1] * patch[2]
    per_block = 2 * n * c * 3 * c + 2 * 2 * n * n * c + 2 * n * c * c + 2 * 2 * n * c * mlp
    return float(embed + layers * per_block)


def vit_b_model_dir(root: Path) -> Path:
    """ViT-B image path (random weights) with a small text tower, saved in our format: the
    Predictor needs the text tower only once, to fill the prompt bank."""
    import dataclasses

    from predictor_load import prompt_vocab_dir  # bench/ is on sys.path (script directory)

    from fvlm_pacs.model import save_model, tiny
    from fvlm_pacs.model.text import load_tokenizer

    tokenizer = load_tokenizer(prompt_vocab_dir(root / "text"))
    config = dataclasses.replace(vit_b(), text=tiny(vocab_size=tokenizer.vocab_size).text)
    torch.manual_seed(0)
    model = FvlmModel(config, tokenizer=tokenizer).eval()
    return save_model(model, root / "model", "bench-vitb", "0")


def whole_study(
    models: dict[str, Path], vol: Volume, labels: np.ndarray, repeats: int, device: str
) -> None:
    """Predictor.run on the whole study: median stage times per (model, mode, precision) and
    the largest score difference between bf16 and fp32 of each model and mode."""
    from fvlm_pacs.domain import LabelMap
    from fvlm_pacs.model.predictor import Predictor

    print("\nper study, Predictor.run (median of repeats; seconds):")
    print(f"  {'model':<12} {'mode':<7} {'precision':<9} {'preprocess':>10} {'encode':>8} "
          f"{'score':>7} {'total':>7}  crops")  # fmt: skip
    for name, folder in models.items():
        for mode in ("crops", "single"):
            scores: dict[str, list[float | None]] = {}
            for precision in ("fp32", "bf16"):
                predictor = Predictor(folder, device=device, mode=mode, precision=precision)  # type: ignore[arg-type]
                lm = LabelMap(array=labels, anatomies=predictor.anatomies, source="bench")
                runs = [predictor.run(vol, lm) for _ in range(repeats + 1)][1:]
                t = {k: statistics.median(r.timings[k] for r in runs) for k in runs[0].timings}
                print(
                    f"  {name:<12} {mode:<7} {precision:<9} {t['preprocess']:10.2f} "
                    f"{t['encode']:8.2f} {t['score']:7.3f} {t['total']:7.2f}  {runs[0].crops}"
                )
                scores[precision] = [f.score for f in runs[0].findings]
            diffs = [
                abs(a - b)
                for a, b in zip(scores["fp32"], scores["bf16"], strict=True)
                if a is not None and b is not None
            ]
            print(f"  {name:<12} {mode:<7} max |score bf16 − fp32| = {max(diffs):.5f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip-monai", action="store_true")
    ap.add_argument("--skip-study", action="store_true", help="skip the whole-study Predictor runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    vol, labels = study()
    t = timed(lambda: anatomy_crops(to_model_grid(vol, labels, 4)), max(1, args.repeats - 1))
    grid = to_model_grid(vol, labels, 4)
    crops = anatomy_crops(grid)
    context = context_crop(grid)
    print(f"preprocess 300×512×512 → {len(crops)} crops {[c.shape for c in crops]}: {t:.2f} s")
    print(f"single-pass context crop: {context.shape}")

    torch.manual_seed(0)
    config = vit_b()
    model = FvlmModel(config).eval().to(device)
    image = torch.rand(1, 1, *CROP, device=device)
    lab = torch.zeros(1, *CROP, dtype=torch.long, device=device)
    lab[:, 10:100, 20:260, 20:330] = 1
    lab[:, 40:80, 100:200, 120:240] = 2

    def ours() -> None:
        with torch.inference_mode():
            model.encode_anatomies(image, lab)

    def ours_bf16() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model.encode_anatomies(image, lab)

    model_bf16 = copy.deepcopy(model)
    cast_linear_weights(model_bf16, torch.bfloat16)  # what Predictor(precision="bf16") does

    def ours_bf16_cast() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model_bf16.encode_anatomies(image, lab)

    v = config.vision
    flops = vit_flops(*CROP, v.patch_size, v.hidden_size, v.num_layers, v.mlp_dim)
    rows = [("fvlm_pacs ViT-B + pooling, fp32", timed(ours, args.repeats))]
    rows.append(("fvlm_pacs ViT-B + pooling, bf16", timed(ours_bf16, args.repeats)))
    rows.append(("  same, matmul weights stored in bf16", timed(ours_bf16_cast, args.repeats)))
    if not args.skip_monai:
        from monai.networks.nets import ViT

        ref = (
            ViT(
                in_channels=1,
                img_size=CROP,
                patch_size=v.patch_size,
                hidden_size=v.hidden_size,
                mlp_dim=v.mlp_dim,
                num_layers=v.num_layers,
                num_heads=v.num_heads,
                classification=False,
            )
            .eval()
            .to(device)
        )

        def monai_vit() -> None:
            with torch.inference_mode():
                ref(image)

        rows.append(("MONAI ViT-B forward, fp32 (peer)", timed(monai_vit, args.repeats)))
    print(f"ViT-B on one {CROP} crop: {flops / 1e12:.2f} TFLOP (analytic)")
    for name, seconds in rows:
        print(f"  {name:<36} {seconds:7.2f} s   {flops / seconds / 1e9:8.1f} GFLOP/s")
    if not args.skip_monai:
        print(f"  ratio fvlm_pacs fp32 / MONAI: {rows[0][1] / rows[-1][1]:.2f}×")
    hist_s = timed(
        lambda: anatomy_histograms(image, lab, len(config.anatomies), HISTOGRAM_EDGES),
        args.repeats,
    )
    print(
        f"  anatomy HU histograms on the same crop (model.histogram_edges): {hist_s:.3f} s, "
        f"{hist_s / rows[0][1]:.3f}× the fp32 encode"
    )
    ctx_s = timed(
        lambda: anatomy_histograms(
            image, lab, len(config.anatomies), HISTOGRAM_EDGES, shell=SHELL, volume=True
        ),
        args.repeats,
    )
    print(
        f"  with surroundings ({SHELL}-voxel shell) and volume (model.histogram_shell, "
        f"histogram_volume): {ctx_s:.3f} s, {ctx_s / rows[0][1]:.3f}× the fp32 encode"
    )
    print(f"  speed-up bf16 (weights stored in bf16) over fp32: {rows[0][1] / rows[2][1]:.2f}×")
    lesion_cost(args.repeats, device)
    ctx_image = torch.from_numpy(context.image)[None, None].to(device)
    ctx_labels = torch.from_numpy(context.labels.astype(np.int64))[None].to(device)

    def single() -> None:
        with torch.inference_mode():
            model.encode_anatomies(ctx_image, ctx_labels)

    single_s = timed(single, args.repeats)
    ctx_flops = vit_flops(*context.shape, v.patch_size, v.hidden_size, v.num_layers, v.mlp_dim)
    per_study = rows[0][1] * len(crops)
    print(f"per study, mode=crops ({len(crops)} passes, fp32): ≈ {per_study:.1f} s encode")
    print(
        f"per study, mode=single (1 pass on {context.shape}, fp32): {single_s:.2f} s encode, "
        f"{ctx_flops / 1e12:.2f} TFLOP, {ctx_flops / single_s / 1e9:.1f} GFLOP/s; "
        f"crops/single = {per_study / single_s:.1f}×"
    )
    if not args.skip_study:
        import tempfile

        from fvlm_pacs.model.checkpoint import demo_model_dir

        with tempfile.TemporaryDirectory() as tmp:
            models = {"ViT-B": vit_b_model_dir(Path(tmp)), "demo": demo_model_dir()}
            whole_study(models, vol, labels, args.repeats, device.type)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
