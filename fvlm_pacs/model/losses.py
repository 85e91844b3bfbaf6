"""Pre-training objectives: the fVLM anatomy-level loss, its co-teaching variant, and a CLIP baseline.

fVLM (FVLM.md "Pre-training objective") contrasts each anatomy's image embedding with the
anatomy-wise text of the same study, one anatomy at a time. Plain InfoNCE would treat two healthy
lungs from different patients as negatives although their texts say the same thing; the objective
fixes that false-negative problem with a *positive matrix* P per anatomy:

* ``P_ij = 1`` when ``i == j``;
* when i and j are both normal for the anatomy (the "normal-sample correction");
* when their anatomy texts are identical (compared after :func:`normalize_text`) and at least
  one of them is abnormal — two normals pair only through the correction, so switching it off
  is a real ablation even though every normal text is the same template.

Targets are ``Y = P`` row-normalised, and the loss is the mean of the image→text and text→image
soft-target cross-entropies. The total is the *sum* over anatomies (not the mean), as the paper.

Co-teaching (the paper's correction for abnormal samples, missing from the public code) softens
the targets with a peer model's similarity distribution: ``Y' = α·Y + (1 − α)·softmax(S_peer)``,
where ``S_peer`` are the peer's logits (its cosine similarities over a temperature), computed
without gradient.

Text queue (an option, :mod:`.text_queue`): the anatomy texts of earlier steps, embedded then and
kept without gradient, join the image→text direction as extra columns, with targets by the same
two rules (identical text, both normal). A CPU batch of 8 gives each image 7 texts to be told
apart from; a queue gives it hundreds, and with them more pairs for the correction to change.
The text→image direction keeps the batch only: the queue holds no images.

Distributed training: the loss is meant to be computed on the **all-gathered** batch (every rank
computes the same loss over the global batch). Gather the embeddings with :func:`gather_with_grad`
and the per-sample texts / flags with :func:`gather_objects` before calling :func:`fvlm_loss`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")

Temperature = float | torch.Tensor
"""A fixed temperature, or the model's learnable ``temp`` (already clamped by the caller, e.g.
``model.temp.clamp(cfg.temperature_min, cfg.temperature_max)``) so that it receives gradient."""


# -- helpers -------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """The form in which two anatomy texts are compared for the identical-text positive rule.

    Whitespace runs collapse to one space, ends are stripped, and case is folded. Why case-fold:
    the text encoder's tokenizer lower-cases (``do_lower_case=True`` in :mod:`.text`) and ignores
    whitespace, so two texts that differ only there get *the same* embedding; calling them
    negatives would ask the model to separate identical inputs. Punctuation is kept — it reaches
    the encoder as tokens.
    """
    return " ".join(text.split()).casefold()


def positive_matrix(
    normal: torch.Tensor, texts: Sequence[str], *, normal_correction: bool = True
) -> torch.Tensor:
    """The [N, N] bool positive matrix P of one anatomy (see the module docstring).

    ``normal`` is bool [N]; ``texts`` the N anatomy texts. The diagonal is always positive, so
    every row has at least one positive and ``Y = P / P.sum(1)`` is well defined. Identical
    texts pair only when at least one of the two samples is abnormal: whether two *normal*
    samples are positives is exactly what the correction decides. Every normal anatomy text is
    the same template, so pairing normals by identical text would make ``normal_correction=False``
    train exactly like the correction (what the issue's prototype observed) and the ablation
    would measure nothing.
    """
    n = len(texts)
    if normal.shape != (n,):
        raise ValueError(f"normal: shape {tuple(normal.shape)} must be ({n},) to match texts")
    pos = positive_pairs(normal, texts, normal, texts, normal_correction=normal_correction)
    return pos | torch.eye(n, dtype=torch.bool, device=normal.device)


def positive_pairs(
    normal_a: torch.Tensor,
    texts_a: Sequence[str],
    normal_b: torch.Tensor,
    texts_b: Sequence[str],
    *,
    normal_correction: bool = True,
) -> torch.Tensor:
    """[A, B] bool: which samples of b are positives of each sample of a by the two rules of
    :func:`positive_matrix` — identical texts with at least one abnormal, and both normal under
    the correction (no diagonal: a and b may be different samples, e.g. a text queue)."""
    ids: dict[str, int] = {}
    device = normal_a.device
    code_a = torch.tensor([ids.setdefault(normalize_text(t), len(ids)) for t in texts_a])
    code_b = torch.tensor([ids.setdefault(normalize_text(t), len(ids)) for t in texts_b])
    na, nb = normal_a.to(torch.bool), normal_b.to(device, torch.bool)
    both_normal = na[:, None] & nb[None, :]
    pos = (code_a.to(device)[:, None] == code_b.to(device)[None, :]) & ~both_normal
    if normal_correction:
        pos |= both_normal
    return pos


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of row-softmax(logits) against probability rows ``target``, mean over rows."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, ndim: int) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name_a}: expected {ndim} dims, got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: shape {tuple(b.shape)} must equal {name_a} {tuple(a.shape)}")


class QueuedTexts(NamedTuple):
    """Earlier steps' texts of one anatomy for :func:`fvlm_anatomy_loss`: ``emb`` [Q, E]
    L2-normalised and detached, ``normal`` bool [Q], ``texts`` the Q texts."""

    emb: torch.Tensor
    normal: torch.Tensor
    texts: Sequence[str]


# -- fVLM objective ------------------------------------------------------------------------
def fvlm_anatomy_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    normal: torch.Tensor,
    texts: Sequence[str],
    tau: Temperature,
    *,
    normal_correction: bool = True,
    peer_logits: torch.Tensor | None = None,
    alpha: float = 0.5,
    queue: QueuedTexts | None = None,
) -> torch.Tensor | None:
    """fVLM loss of ONE anatomy over the N samples that hold it wholly inside the crop.

    ``image_emb`` / ``text_emb`` are [N, E] L2-normalised (the caller has already dropped samples
    whose anatomy is absent or cut off); ``normal`` bool [N]; ``texts`` the N anatomy texts;
    ``tau`` the temperature. ``S = image_emb @ text_embᵀ / tau``; the loss is
    ``½ [CE(softmax rows of S, Y) + CE(softmax rows of Sᵀ, Y)]``.

    ``peer_logits`` (co-teaching): the peer model's [N, N] logits for the same samples
    (``v_peer @ t_peerᵀ / tau_peer``); they are detached here. The image→text targets become
    ``α·Y + (1 − α)·softmax(peer_logits)`` and the text→image targets
    ``α·Y + (1 − α)·softmax(peer_logitsᵀ)`` — each direction is softened by the peer's view in
    the same direction (Y is symmetric, the peer's distribution is not).

    ``queue``: earlier texts of this anatomy (module docstring): the image→text logits gain
    ``image_emb @ queue.embᵀ / tau`` as Q more columns, positives by :func:`positive_pairs`, and
    the row targets are normalised over all N + Q columns. Not with ``peer_logits`` (the peer
    would need its own queue). An empty queue is no queue.

    Returns None — the anatomy is skipped — when

    * no sample is abnormal (FVLM.md): every pair is then positive under the normal correction,
      so there is nothing to contrast;
    * N < 2: a single sample has no negatives, its loss is identically 0 with no gradient, and
      reporting 0.0 would look like a perfectly learnt anatomy.
    """
    _check_pair("image_emb", image_emb, "text_emb", text_emb, 2)
    n = image_emb.shape[0]
    if len(texts) != n:
        raise ValueError(f"texts: {len(texts)} texts for {n} embeddings")
    if normal.shape != (n,):
        raise ValueError(f"normal: shape {tuple(normal.shape)} must be ({n},)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: {alpha} must lie in [0, 1]")
    if queue is not None and peer_logits is not None:
        raise ValueError("queue: not with co-teaching (peer_logits)")
    if queue is not None and not (
        queue.emb.ndim == 2
        and queue.emb.shape[1] == image_emb.shape[1]
        and queue.normal.shape == (queue.emb.shape[0],) == (len(queue.texts),)
    ):
        raise ValueError(
            f"queue: emb {tuple(queue.emb.shape)}, normal {tuple(queue.normal.shape)} and "
            f"{len(queue.texts)} texts must describe the same Q texts of width {image_emb.shape[1]}"
        )
    if n < 2 or bool(normal.to(torch.bool).all()):
        return None
    logits = image_emb @ text_emb.t() / tau
    pos = positive_matrix(normal, texts, normal_correction=normal_correction).to(logits.dtype)
    target = pos / pos.sum(dim=1, keepdim=True)
    if queue is not None and len(queue.texts) > 0:
        queued = image_emb @ queue.emb.detach().to(image_emb.dtype).t() / tau
        extra = positive_pairs(
            normal, texts, queue.normal, queue.texts, normal_correction=normal_correction
        ).to(logits.dtype)
        wide = torch.cat([pos, extra], dim=1)
        i2t = _soft_ce(torch.cat([logits, queued], dim=1), wide / wide.sum(dim=1, keepdim=True))
        return 0.5 * (i2t + _soft_ce(logits.t(), target))
    target_i2t = target_t2i = target
    if peer_logits is not None:
        if peer_logits.shape != (n, n):
            raise ValueError(f"peer_logits: shape {tuple(peer_logits.shape)} must be ({n}, {n})")
        peer = peer_logits.detach().to(logits.dtype)
        target_i2t = alpha * target + (1.0 - alpha) * F.softmax(peer, dim=1)
        target_t2i = alpha * target + (1.0 - alpha) * F.softmax(peer.t(), dim=1)
    return 0.5 * (_soft_ce(logits, target_i2t) + _soft_ce(logits.t(), target_t2i))


def usable_rows(
    inside: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor
) -> torch.Tensor:
    """bool [B, K]: the (sample, anatomy) pairs that enter the loss.

    A pair counts when the caller marks the anatomy wholly inside the crop *and* both embeddings
    are finite: :meth:`FvlmModel.encode_anatomies` returns NaN rows for an absent anatomy, and one
    NaN in S would poison the whole anatomy's loss.
    """
    finite = torch.isfinite(image_emb).all(dim=-1) & torch.isfinite(text_emb).all(dim=-1)
    return inside.to(torch.bool) & finite


def fvlm_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    normal: torch.Tensor,
    inside: torch.Tensor,
    texts: Sequence[Sequence[str]],
    tau: Temperature,
    *,
    normal_correction: bool = True,
    peer_image_emb: torch.Tensor | None = None,
    peer_text_emb: torch.Tensor | None = None,
    peer_tau: Temperature | None = None,
    alpha: float = 0.5,
    queue: Sequence[QueuedTexts] | None = None,
) -> tuple[torch.Tensor, dict[int, float]]:
    """The fVLM objective over a (gathered) batch: Σ_k of :func:`fvlm_anatomy_loss`.

    ``image_emb`` [B, K, E] (from ``encode_anatomies``, NaN rows allowed), ``text_emb`` [B, K, E]
    (the anatomy-wise texts encoded), ``normal`` and ``inside`` bool [B, K], ``texts`` B lists of K
    strings. Rows that are not ``inside`` or hold a NaN are left out of anatomy k (see
    :func:`usable_rows`).

    Co-teaching: pass the peer model's embeddings of the same batch as ``peer_image_emb`` /
    ``peer_text_emb`` (same shapes; ``peer_tau`` defaults to ``tau``). Their logits are computed
    here under ``no_grad`` so the caller cannot leak gradient into the peer. The peer sees the same
    crops and label maps, so its absent rows must match; a row usable for this model but not
    finite for the peer is an error.

    ``queue``: one :class:`QueuedTexts` per anatomy (:meth:`.text_queue.TextQueue.queued`).

    Returns ``(total, per_anatomy)``: ``total`` a scalar tensor (the sum over non-skipped
    anatomies); ``per_anatomy`` maps anatomy index k → its loss value for logging, skipped
    anatomies absent. When every anatomy is skipped, ``total`` is 0 but still attached to the graph
    (``0 · Σ embeddings``) so ``backward()`` and DDP's gradient all-reduce run on every rank.
    """
    _check_pair("image_emb", image_emb, "text_emb", text_emb, 3)
    b, k, _ = image_emb.shape
    for name, flags in (("normal", normal), ("inside", inside)):
        if flags.shape != (b, k):
            raise ValueError(f"{name}: shape {tuple(flags.shape)} must be ({b}, {k})")
    if len(texts) != b or any(len(row) != k for row in texts):
        raise ValueError(f"texts: must be {b} lists of {k} strings")
    if (peer_image_emb is None) != (peer_text_emb is None):
        raise ValueError("peer_text_emb: give both peer_image_emb and peer_text_emb, or neither")
    if peer_image_emb is not None and peer_text_emb is not None:
        _check_pair("image_emb", image_emb, "peer_image_emb", peer_image_emb, 3)
        _check_pair("image_emb", image_emb, "peer_text_emb", peer_text_emb, 3)
    if queue is not None and len(queue) != k:
        raise ValueError(f"queue: {len(queue)} anatomies, the embeddings have {k}")
    use = usable_rows(inside, image_emb, text_emb)
    peer_tau = tau if peer_tau is None else peer_tau
    losses: dict[int, torch.Tensor] = {}
    for a in range(k):
        rows = torch.nonzero(use[:, a]).flatten()
        if rows.numel() < 2:
            continue
        peer_logits = None
        if peer_image_emb is not None and peer_text_emb is not None:
            with torch.no_grad():
                pv, pt = peer_image_emb[rows, a], peer_text_emb[rows, a]
                if not (torch.isfinite(pv).all() and torch.isfinite(pt).all()):
                    raise ValueError(
                        f"peer_image_emb: anatomy {a} is not finite for a sample this model uses"
                    )
                peer_logits = pv @ pt.t() / peer_tau
        row_list = rows.tolist()
        loss = fvlm_anatomy_loss(
            image_emb[rows, a],
            text_emb[rows, a],
            normal[rows, a],
            [texts[i][a] for i in row_list],
            tau,
            normal_correction=normal_correction,
            peer_logits=peer_logits,
            alpha=alpha,
            queue=queue[a] if queue is not None else None,
        )
        if loss is not None:
            losses[a] = loss
    if not losses:
        anchor = image_emb.nan_to_num(0.0).sum() + text_emb.nan_to_num(0.0).sum()
        return anchor * 0.0, {}
    stacked = torch.stack(list(losses.values()))
    values = stacked.detach().cpu().tolist()  # one device sync for all anatomies
    return stacked.sum(), dict(zip(losses.keys(), values, strict=True))


# -- CLIP-style global baseline ------------------------------------------------------------
def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, tau: Temperature) -> torch.Tensor:
    """Symmetric InfoNCE with identity targets (CLIP): the global baseline fVLM must beat.

    ``image_emb`` / ``text_emb`` [B, E] L2-normalised (whole volume vs whole report). Every
    off-diagonal pair is a negative — exactly the false-negative problem fVLM's positive matrix
    addresses, which is why it is the baseline.
    """
    _check_pair("image_emb", image_emb, "text_emb", text_emb, 2)
    logits = image_emb @ text_emb.t() / tau
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def clip_image_embedding(level_tokens: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """[B, E] whole-volume embedding for the CLIP baseline with fVLM's own encoder.

    ``level_tokens`` [B, N, C] are the tokens of the ViT's final level; they are mean-pooled over
    all N tokens (no anatomy mask — that is the point of the baseline), projected by ``proj``
    (C → E) and L2-normalised, the same space the text side lives in.
    """
    if level_tokens.ndim != 3:
        raise ValueError(f"level_tokens: expected [B, N, C], got shape {tuple(level_tokens.shape)}")
    return F.normalize(proj(level_tokens.mean(dim=1)), dim=-1)


# -- distributed -----------------------------------------------------------------------------
def _dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` [B, ...] from every rank along dim 0, differentiably; identity without DDP.

    Uses the differentiable functional all-gather (``_functional_collectives.all_gather_single``;
    ``torch.distributed.nn.functional.all_gather`` on older torch), whose backward is a
    reduce-scatter: it sums every rank's gradient for each slice back to its owner. Every rank
    computes the same loss on the gathered batch, so the owner receives ``world_size ×`` the
    gradient of that loss; DDP then averages parameter gradients over ranks, giving exactly the
    gradient of the one global loss. Every rank must
    pass the same B (use ``drop_last``). Tensors without gradient (flags, masks, bools) go through
    a plain ``all_gather``.
    """
    if not _dist_active():
        return x
    import torch.distributed as dist

    if x.requires_grad:
        from torch.distributed import _functional_collectives as fc

        world = dist.group.WORLD
        if hasattr(fc, "all_gather_single") and world is not None:  # newer torch: not deprecated
            return fc.all_gather_single(x.contiguous(), 0, world)
        from torch.distributed.nn.functional import all_gather

        return torch.cat(list(all_gather(x)), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_objects(items: Sequence[T]) -> list[T]:
    """All-gather a per-rank list of picklable items (texts, flags) in rank order; a copy without
    DDP. The order matches :func:`gather_with_grad`, so row i of a gathered tensor and item i of
    the gathered list describe the same sample."""
    if not _dist_active():
        return list(items)
    import torch.distributed as dist

    buckets: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(buckets, list(items))
    return [item for bucket in buckets for item in bucket]
