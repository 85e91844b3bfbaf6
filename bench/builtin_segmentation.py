"""Time the ``builtin`` segmentation provider on a CT-sized volume and print its Dice.

    python bench/builtin_segmentation.py [--model-dir DIR] [--shape 300 512 512]
                                         [--spacing 1.0 0.7 0.7] [--threads 2] [--repeat 2]

A default-size chest phantom (``fvlm_pacs.phantoms.make_case``) is sampled (nearest neighbour)
onto a grid of ``--shape`` voxels at ``--spacing`` mm — the size of a typical 512² chest CT —
and segmented ``--repeat`` times on the CPU with ``torch.set_num_threads(--threads)``. Printed:
seconds per call (wall clock, whole provider: orientation, resampling, network, clean-up, back
to the CT grid), and Dice per anatomy against the phantom's exact labels on that grid. Nothing
is asserted. ``--model-dir`` defaults to the network shipped in the demo model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import torch

from fvlm_pacs.codes import load_anatomies
from fvlm_pacs.domain import Volume
from fvlm_pacs.phantoms import make_case
from fvlm_pacs.segmentation.builtin import BuiltinSegmenter, default_model_dir, sample_nearest


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
    provider.check()
    print(f"load: {time.perf_counter() - t0:.2f} s ({args.model_dir})")
    for i in range(args.repeat):
        t0 = time.perf_counter()
        out = provider.segment(volume, [])
        seconds = time.perf_counter() - t0
        dice = {}
        for a in table.anatomies:
            p, t = out.array == a.label, truth == a.label
            dice[a.name] = round(2 * int((p & t).sum()) / max(1, int(p.sum() + t.sum())), 3)
        print(
            f"run {i + 1}: {seconds:.2f} s for {'×'.join(map(str, shape))} voxels at "
            f"{args.spacing} mm, {args.threads} thread(s); Dice {dice}"
        )


if __name__ == "__main__":
    main()
