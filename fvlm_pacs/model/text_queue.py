"""A first-in-first-out queue of earlier steps' anatomy texts for the fVLM objective.

Why: the anatomy-level contrastive loss tells each image apart from the texts of its batch. On
a CPU the batch is 8, so a lung image sees 7 other lung texts per step — few of them with the
findings it must tell apart — and two normal samples meet rarely, so the normal-sample
correction has little to change. A queue of the last ``size`` texts per anatomy, embedded when
they were seen and kept without gradient, gives every image that many more columns
(:class:`~fvlm_pacs.model.losses.QueuedTexts`, FVLM.md targets by the same rules) at the cost
of one matrix product: no text is encoded twice. The embeddings are as old as ``size / batch``
steps, the usual price of a memory queue. Measured (bench/README.md, 256 texts on the
``fvlm-demo 3`` recipe): 0.788 held-out AUC with the normal-sample correction, 0.498 without it
— most queued columns are other cases' normal texts, false negatives unless corrected — so keep
the ``fvlm`` objective with a queue.

Every rank pushes the all-gathered batch, so under DDP all ranks hold the same queue. The state
(:meth:`TextQueue.state_dict`) goes into the training checkpoint: a resumed run continues with
the queue the uninterrupted one had.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .losses import QueuedTexts


class TextQueue:
    """The last ``size`` (embedding, normal flag, text) of each of ``anatomies`` anatomies."""

    def __init__(self, size: int, anatomies: int, dim: int) -> None:
        if size < 1 or anatomies < 1 or dim < 1:
            raise ValueError(
                f"TextQueue: size, anatomies and dim must be >= 1, got {size}, {anatomies}, {dim}"
            )
        self.size = size
        self.dim = dim
        self._emb = [torch.zeros(0, dim) for _ in range(anatomies)]
        self._normal = [torch.zeros(0, dtype=torch.bool) for _ in range(anatomies)]
        self._texts: list[list[str]] = [[] for _ in range(anatomies)]

    def queued(self, device: torch.device | str = "cpu") -> list[QueuedTexts]:
        """One :class:`QueuedTexts` per anatomy, the oldest first, on ``device``."""
        return [
            QueuedTexts(e.to(device), n.to(device), tuple(t))
            for e, n, t in zip(self._emb, self._normal, self._texts, strict=True)
        ]

    def push(
        self,
        text_emb: torch.Tensor,
        normal: torch.Tensor,
        usable: torch.Tensor,
        texts: Sequence[Sequence[str]],
    ) -> None:
        """Append the usable rows of a (gathered) batch — ``text_emb`` [B, K, E], ``normal`` and
        ``usable`` bool [B, K], ``texts`` B lists of K — and drop the oldest beyond ``size``."""
        k = len(self._texts)
        if text_emb.ndim != 3 or text_emb.shape[1:] != (k, self.dim):
            raise ValueError(
                f"text_emb: shape {tuple(text_emb.shape)} must be [B, {k}, {self.dim}]"
            )
        emb = text_emb.detach().float().cpu()
        flags, use = normal.detach().bool().cpu(), usable.detach().bool().cpu()
        for a in range(k):
            rows = torch.nonzero(use[:, a]).flatten()
            if rows.numel() == 0:
                continue
            self._emb[a] = torch.cat([self._emb[a], emb[rows, a]])[-self.size :]
            self._normal[a] = torch.cat([self._normal[a], flags[rows, a]])[-self.size :]
            self._texts[a] = (self._texts[a] + [texts[i][a] for i in rows.tolist()])[-self.size :]

    def state_dict(self) -> dict[str, Any]:
        """Tensors and text lists only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "size": self.size,
            "emb": [e.clone() for e in self._emb],
            "normal": [n.clone() for n in self._normal],
            "texts": [list(t) for t in self._texts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a queue of another shape is a :class:`ValueError`."""
        emb = list(state["emb"])
        if int(state["size"]) != self.size or len(emb) != len(self._emb):
            raise ValueError(
                f"text queue: checkpoint holds size {state['size']} for {len(emb)} anatomies, "
                f"the run asks for {self.size} for {len(self._emb)}"
            )
        self._emb = [e.float() for e in emb]
        self._normal = [n.bool() for n in state["normal"]]
        self._texts = [list(t) for t in state["texts"]]
