"""Time the ``builtin`` segmentation provider on a CT-sized volume and print its Dice.

    python bench/builtin_segmentation.py [--model-dir DIR] [--shape 300 512 512]
                                         [--spacing 1.0 0.7 0.7] [--threads 2] [--repeat 2]

A default-size chest phantom (``fvlm_pacs.phantoms.make_case``) is sampled (nearest neighbour)
onto a grid of ``--shape`` voxels at ``--spacing`` mm — the size of a typical 512² chest CT —
and segmented ``--repeat`` times on the CPU with ``torch.set_num_threads(--threads)``, each time
with both ways back to the CT grid (``SegNetConfig.upsampling``: ``linear``, the provider's,
and ``nearest``, the one before it, as the peer). Printed: seconds per call (wall clock, the
provider's whole path: orientation, resampling, network, clean-up, back to the CT grid), Dice
per anatomy against the phantom's exact labels on that grid, and linear ÷ nearest. Nothing is
asserted. ``--model-dir`` defaults to the network shipped in the demo model.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import torch

from fvlm_pacs.codes import load_anatomies
from fvlm_pacs.domain import Volume
from fvlm_pacs.phantoms import make_case
from fvlm_pacs.segmentation.builtin import (
    UPSAMPLINGS,
    BuiltinSegmenter,
    default_model_dir,
    sample_nearest,
    segment_voxels,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=default_model_dir())
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.0, 0.7, 0.7))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    case = make_case(args.seed)
    shape = tuple(args.shape)
    sz, sy, sx = args.spacing
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = sz, sy, sx, 1.0
    affine[:3, 3] = (-(shape[2] - 1) / 2 * sx, -(shape[1] - 1) / 2 * sy, -(shape[0] - 1) / 2 * sz)
    hu = sample_nearest(case.hu.astype(np.float32), case.affine, shape, affine)
    truth = sample_nearest(case.labels, case.affine, shape, affine)
    volume = Volume(hd.Volume(hu, affine, "PATIENT"), "bench", "bench", (), "")

    table = load_anatomies("ct-rate")
    provider = BuiltinSegmenter(table, model_dir=args.model_dir, device="cpu")
    t0 = time.perf_counter()
    loaded = provider.check()
    print(f"load: {time.perf_counter() - t0:.2f} s ({args.model_dir})")
    seconds: dict[str, list[float]] = {mode: [] for mode in UPSAMPLINGS}
    for i in range(args.repeat):
        for mode in UPSAMPLINGS:
            net = dataclasses.replace(
                loaded, config=dataclasses.replace(loaded.config, upsampling=mode)
            )
            t0 = time.perf_counter()
            labels = segment_voxels(net, volume.voxels)
            seconds[mode].append(time.perf_counter() - t0)
            dice = {}
            for k, name in enumerate(loaded.config.anatomies, start=1):
                p, t = labels == k, truth == table.label_of(name)
                dice[name] = round(2 * int((p & t).sum()) / max(1, int(p.sum() + t.sum())), 3)
            print(
                f"run {i + 1} {mode:>7}: {seconds[mode][-1]:.2f} s for "
                f"{'×'.join(map(str, shape))} voxels at {args.spacing} mm, {args.threads} "
                f"thread(s); Dice {dice}"
            )
    best = {mode: min(times) for mode, times in seconds.items()}
    print(
        f"best of {args.repeat}: linear {best['linear']:.2f} s, nearest {best['nearest']:.2f} s, "
        f"linear ÷ nearest {best['linear'] / best['nearest']:.2f}×"
    )


if __name__ == "__main__":
    main()
