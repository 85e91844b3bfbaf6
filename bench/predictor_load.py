"""Predictor start-up cost with a cold and a warm prompt bank: load time, peak and steady RSS.

    python bench/predictor_load.py [--threads 2] [--device cpu] [--dir DIR] [--keep]

Writes one fVLM at released dimensions (ViT-B image encoder + BERT-base text tower, random
weights, ~0.8 GB of float32) in our format to a temporary folder, then measures, each in a fresh
Python process run one after the other (a process's peak RSS cannot be reset cleanly, and memory
freed by one load would hide the next one's), three ways to get a ready model:

* ``whole-file read`` — the loader before the text tower became optional, for comparison:
  a full model, ``safetensors.torch.load_file`` (the whole file as tensors) and a strict
  ``load_state_dict``; the tower is kept, as the Predictor kept it then;
* ``full load`` — ``load_model(dir)`` with the text tower, kept (the key-by-key loader):
  the steady figure of a process that keeps BERT;
* ``Predictor, cold bank`` — no ``prompt_bank.safetensors``: the full model is loaded, the 32
  CT-RATE prompts are embedded by BERT and saved, then the text tower is dropped;
* ``Predictor, warm bank`` — the bank written by the cold run: the model is loaded without the
  text tower (its tensors are neither allocated nor read).

For each: wall time of the load (sha256 of the weights file included; the page cache is warm,
the file having just been written), the process's RSS after imports, its peak RSS (``VmHWM``)
and its steady RSS once loaded (``VmRSS`` after ``gc.collect()``; anonymous and file-backed
parts). Linux only (``/proc/self/status``). Nothing is asserted; figures only.

Reading the peak: safetensors maps the weights file, and every page a load touches counts in
RSS (file-backed, clean page cache) until the file is closed — so the peak is about the model
plus the part of the file that was read, whatever the loader; the anonymous memory a load
keeps is the steady ``anon`` column.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PHASES = ("whole", "full", "cold", "warm")
LABELS = {
    "whole": "whole-file read, tower kept",
    "full": "full load (text tower kept)",
    "cold": "Predictor, cold bank",
    "warm": "Predictor, warm bank",
}


def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MiB."""
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) / 1024
    return out


def prompt_vocab_dir(text_dir: Path) -> Path:
    """A WordPiece ``vocab.txt`` with every word of the CT-RATE prompts (so prompts embed
    differently, not all as [UNK]); shared with ``inference.py``."""
    import string

    from fvlm_pacs.codes import load_anatomies, load_findings

    words = {
        w.lower().strip(".")
        for f in load_findings(load_anatomies("ct-rate"))
        for w in f"{f.positive} {f.negative}".split()
    }
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + sorted(words)
    text_dir.mkdir(parents=True, exist_ok=True)
    (text_dir / "vocab.txt").write_text("\n".join(vocab + list(string.ascii_lowercase)) + "\n")
    return text_dir


def build(folder: Path) -> dict[str, Any]:
    """Random ViT-B + BERT-base weights saved in our format, with a small local tokenizer."""
    import torch

    from fvlm_pacs.model import FvlmModel, save_model, vit_b
    from fvlm_pacs.model.text import load_tokenizer

    text_dir = prompt_vocab_dir(folder / "text")
    t = time.perf_counter()
    torch.manual_seed(0)
    model = FvlmModel(vit_b(), tokenizer=load_tokenizer(text_dir)).eval()
    out = save_model(model, folder / "model", "bench-vitb", "0")
    params = sum(p.numel() for p in model.parameters())
    text = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.startswith(("text_encoder.", "text_proj."))
    )
    return {
        "seconds": time.perf_counter() - t,
        "params": params,
        "text_params": text,
        "file_mib": (out / "model.safetensors").stat().st_size / 2**20,
    }


def measure(phase: str, folder: Path, device: str) -> dict[str, Any]:
    """One way to get a ready model, in this (fresh) process."""
    import torch

    from fvlm_pacs.model import Predictor, load_model

    base = proc_status()
    t = time.perf_counter()
    if phase == "whole":
        from safetensors.torch import load_file

        from fvlm_pacs.model import FvlmModel, ModelConfig
        from fvlm_pacs.model.checkpoint import (
            WEIGHTS_FILE,
            load_state_strict,
            read_meta,
            sha256_file,
        )

        meta = read_meta(folder)
        sha256_file(folder / WEIGHTS_FILE)
        model = FvlmModel(ModelConfig.from_dict(meta["model"]))
        load_state_strict(model, load_file(str(folder / WEIGHTS_FILE)))
        holder: Any = model.to(device).eval()
    elif phase == "full":
        model = load_model(folder, device=device)
        holder = model
    else:
        holder = Predictor(folder, device=device)
        model = holder.model
    seconds = time.perf_counter() - t
    gc.collect()
    steady = proc_status()
    return {
        "phase": phase,
        "seconds": seconds,
        "base_rss": base["VmRSS"],
        "peak_rss": steady["VmHWM"],
        "steady_rss": steady["VmRSS"],
        "steady_anon": steady["RssAnon"],
        "steady_file": steady["RssFile"],
        "text_tower": model.has_text,
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "ready": holder is not None,
    }


def child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.dir)
    result = (
        build(folder)
        if args.phase == "build"
        else measure(args.phase, folder / "model", args.device)
    )
    print(json.dumps(result))


def run_phase(phase: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", phase, "--dir", str(folder)]
    cmd += ["--threads", str(args.threads), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"phase {phase} failed with exit code {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the written model")
    ap.add_argument("--phase", choices=("build", *PHASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        child(args)
        return

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fvlm_predictor_load_"))
    try:
        b = run_phase("build", folder, args)
        print(
            f"model: ViT-B + BERT-base, {b['params'] / 1e6:.1f} M parameters "
            f"({b['text_params'] / 1e6:.1f} M in the text tower), weights file "
            f"{b['file_mib']:.0f} MiB, built and saved in {b['seconds']:.1f} s"
        )
        (folder / "model" / "prompt_bank.safetensors").unlink(missing_ok=True)
        rows = [run_phase(phase, folder, args) for phase in PHASES]
        print(f"device {args.device}, {rows[0]['threads']} threads; each row a fresh process")
        head = (
            f"{'':32} {'load s':>7} {'RSS after imports':>18} {'peak RSS':>9} "
            f"{'steady RSS':>11} {'(anon':>7} {'file)':>6}  text tower"
        )
        print(head + "   (MiB)")
        for r in rows:
            print(
                f"{LABELS[r['phase']]:32} {r['seconds']:7.2f} {r['base_rss']:18.0f} "
                f"{r['peak_rss']:9.0f} {r['steady_rss']:11.0f} {r['steady_anon']:7.0f} "
                f"{r['steady_file']:6.0f}  {'kept' if r['text_tower'] else 'none'}"
            )
        whole, full, cold, warm = rows
        print(
            f"warm vs cold: load {cold['seconds'] / warm['seconds']:.1f}× faster, peak RSS "
            f"−{cold['peak_rss'] - warm['peak_rss']:.0f} MiB; steady RSS vs a kept text tower: "
            f"cold −{full['steady_rss'] - cold['steady_rss']:.0f} MiB, "
            f"warm −{full['steady_rss'] - warm['steady_rss']:.0f} MiB; key-by-key vs whole-file "
            f"read: load {full['seconds'] - whole['seconds']:+.2f} s, "
            f"peak {full['peak_rss'] - whole['peak_rss']:+.0f} MiB"
        )
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
        elif args.keep:
            print(f"model kept in {folder / 'model'}")


if __name__ == "__main__":
    main()
