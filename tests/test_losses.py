"""Pre-training losses: hand-computed fVLM / CLIP values, positive matrix, skips, co-teaching, DDP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fvlm_pacs.model.losses import (
    QueuedTexts,
    clip_image_embedding,
    clip_loss,
    fvlm_anatomy_loss,
    fvlm_loss,
    gather_objects,
    gather_with_grad,
    normalize_text,
    positive_matrix,
)
from fvlm_pacs.model.text_queue import TextQueue

NORMAL = "lung shows no significant abnormalities."

# Three samples, 2-d embeddings, tau = 0.5:
#   v·tᵀ = [[1, .6, 0], [0, .8, 1], [.6, 1, .8]]  ->  S = v·tᵀ / 0.5
V3 = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
T3 = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
S3 = [[2.0, 1.2, 0.0], [0.0, 1.6, 2.0], [1.2, 2.0, 1.6]]


def hand_ce(s: list[list[float]], y: list[list[float]]) -> float:
    """Soft-target CE of row-softmax(s) against y, mean over rows, with plain math."""
    total = 0.0
    for srow, yrow in zip(s, y, strict=True):
        lse = math.log(sum(math.exp(v) for v in srow))
        total += -sum(yv * (sv - lse) for sv, yv in zip(srow, yrow, strict=True))
    return total / len(s)


def transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(r) for r in zip(*m, strict=True)]


def hand_softmax(m: list[list[float]]) -> list[list[float]]:
    out = []
    for row in m:
        z = sum(math.exp(v) for v in row)
        out.append([math.exp(v) / z for v in row])
    return out


def t(x: list[list[float]]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def b(x: list[bool]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.bool)


# -- hand computations ---------------------------------------------------------------------
def test_anatomy_loss_matches_hand_computation_with_normal_correction() -> None:
    normal = b([True, False, True])
    texts = ["lung is clear.", "nodule in the left lung.", NORMAL]  # normals worded differently
    # P pairs the two normals (0, 2); Y = P row-normalised
    y = [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]
    expected = 0.5 * (hand_ce(S3, y) + hand_ce(transpose(S3), y))
    got = fvlm_anatomy_loss(t(V3), t(T3), normal, texts, 0.5)
    assert got is not None
    assert abs(got.item() - expected) < 1e-6


def test_anatomy_loss_without_correction_is_plain_infonce_for_distinct_texts() -> None:
    normal = b([True, False, True])
    texts = ["lung is clear.", "nodule in the left lung.", NORMAL]
    y = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    expected = 0.5 * (hand_ce(S3, y) + hand_ce(transpose(S3), y))
    got = fvlm_anatomy_loss(t(V3), t(T3), normal, texts, 0.5, normal_correction=False)
    assert got is not None
    assert abs(got.item() - expected) < 1e-6
    # and it equals CLIP's symmetric InfoNCE on the same pairs
    assert abs(clip_loss(t(V3), t(T3), 0.5).item() - expected) < 1e-6


def test_anatomy_loss_four_samples_identical_abnormal_texts() -> None:
    # 4 samples: 0 normal, 1 and 3 share one abnormal text (up to case and spaces), 2 alone
    v = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]]
    tx = [[0.0, 1.0], [1.0, 0.0], [0.8, 0.6], [0.6, 0.8]]
    tau = 0.25
    s = [[sum(a * c for a, c in zip(vi, tj, strict=True)) / tau for tj in tx] for vi in v]
    y = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.5, 0.0, 0.5],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.5, 0.0, 0.5],
    ]
    texts = [NORMAL, "Emphysema  in both lungs.", "pleural effusion.", "emphysema in both lungs. "]
    expected = 0.5 * (hand_ce(s, y) + hand_ce(transpose(s), y))
    got = fvlm_anatomy_loss(t(v), t(tx), b([True, False, False, False]), texts, tau)
    assert got is not None
    assert abs(got.item() - expected) < 1e-6


def test_learnable_temperature_tensor_gets_gradient() -> None:
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    got = fvlm_anatomy_loss(t(V3), t(T3), b([True, False, True]), ["a", "b", "c"], tau)
    assert got is not None
    got.backward()
    assert tau.grad is not None and torch.isfinite(tau.grad)


# -- positive matrix -----------------------------------------------------------------------
def test_all_normals_collapse_to_one_positive_block() -> None:
    normal = b([True, False, True, True, False])
    texts = ["clear", "nodule", "unremarkable", NORMAL, "mass"]  # varied normal wording
    pos = positive_matrix(normal, texts)
    expected = torch.eye(5, dtype=torch.bool)
    for i in (0, 2, 3):
        for j in (0, 2, 3):
            expected[i, j] = True
    assert torch.equal(pos, expected)


def test_identical_abnormal_texts_pair_and_normalisation() -> None:
    assert normalize_text("  Nodule\tin the  LEFT lung. ") == "nodule in the left lung."
    normal = b([False, False, False])
    pos = positive_matrix(normal, ["Nodule in the left lung.", "mass", "nodule  in the left lung."])
    assert pos[0, 2] and pos[2, 0] and not pos[0, 1] and not pos[1, 2]
    # punctuation is kept: it reaches the encoder as a token
    assert not positive_matrix(b([False, False]), ["mass.", "mass"])[0, 1]


def test_without_correction_varied_normals_do_not_pair() -> None:
    normal = b([True, True, False])
    pos = positive_matrix(normal, ["clear", "unremarkable", "mass"], normal_correction=False)
    assert torch.equal(pos, torch.eye(3, dtype=torch.bool))


def test_without_correction_identical_normal_template_does_not_pair() -> None:
    # Every normal text is the template: pairing them by identical text would make the
    # correction a no-op (the prototype's observation), so only the correction pairs normals.
    normal = b([True, True, False, False])
    texts = [NORMAL, NORMAL, "mass", "mass"]
    off = positive_matrix(normal, texts, normal_correction=False)
    on = positive_matrix(normal, texts, normal_correction=True)
    assert not off[0, 1] and on[0, 1]
    assert off[2, 3] and on[2, 3]  # identical abnormal texts pair either way
    assert not off[0, 2] and not on[0, 2]


# -- skip rules ------------------------------------------------------------------------------
def test_skip_when_no_abnormal_sample_or_single_sample() -> None:
    assert fvlm_anatomy_loss(t(V3), t(T3), b([True, True, True]), [NORMAL] * 3, 0.5) is None
    assert fvlm_anatomy_loss(t(V3[:1]), t(T3[:1]), b([False]), ["mass"], 0.5) is None


# -- text queue -----------------------------------------------------------------------------
# Two samples (normal, abnormal "A"), three queued texts (the normal template, "A", "B"):
#   batch S = v·tᵀ / 0.5 with v = t = I; queued columns v·qᵀ / 0.5.
QV = [[1.0, 0.0], [0.0, 1.0]]
QUEUE = [[0.6, 0.8], [0.0, 1.0], [0.8, -0.6]]
QS = [[2.0, 0.0, 1.2, 0.0, 1.6], [0.0, 2.0, 1.6, 2.0, -1.2]]  # [batch | queue] logits


def queued(texts: list[str], normal: list[bool]) -> QueuedTexts:
    return QueuedTexts(t(QUEUE), b(normal), texts)


@pytest.mark.parametrize("correction", [True, False])
def test_queue_joins_the_image_to_text_direction_by_the_same_rules(correction: bool) -> None:
    q = queued([NORMAL, "A", "B"], [True, False, False])
    got = fvlm_anatomy_loss(
        t(QV), t(QV), b([True, False]), [NORMAL, "A"], 0.5, normal_correction=correction, queue=q
    )
    # row 0 (normal): itself + the queued normal under the correction; row 1 ("A"): itself +
    # the queued "A" (identical text, abnormal) whatever the correction
    y0 = [0.5, 0, 0.5, 0, 0] if correction else [1.0, 0, 0, 0, 0]
    i2t = hand_ce(QS, [y0, [0, 0.5, 0, 0.5, 0]])
    t2i = hand_ce(transpose([r[:2] for r in QS]), [[1.0, 0.0], [0.0, 1.0]])
    assert got is not None and float(got) == pytest.approx(0.5 * (i2t + t2i), abs=1e-12)


def test_empty_queue_is_no_queue_and_queue_gets_no_gradient() -> None:
    v = t(V3).requires_grad_()
    args = (v, t(T3), b([True, False, False]), [NORMAL, "A", "B"], 0.5)
    plain = fvlm_anatomy_loss(*args)
    empty = QueuedTexts(torch.zeros(0, 2, dtype=torch.float64), b([]), [])
    with_empty = fvlm_anatomy_loss(*args, queue=empty)
    assert plain is not None and with_empty is not None
    assert float(with_empty.detach()) == float(plain.detach())
    q = t(QUEUE).requires_grad_()
    loss = fvlm_anatomy_loss(*args, queue=QueuedTexts(q, b([True, False, False]), ["x"] * 3))
    assert loss is not None
    loss.backward()
    assert q.grad is None and v.grad is not None


def test_queue_arguments_are_checked() -> None:
    args = (t(QV), t(QV), b([True, False]), [NORMAL, "A"], 0.5)
    with pytest.raises(ValueError, match="co-teaching"):
        fvlm_anatomy_loss(*args, peer_logits=t(QV), queue=queued(["a", "b", "c"], [0, 0, 0]))
    with pytest.raises(ValueError, match="queue"):
        fvlm_anatomy_loss(*args, queue=queued(["a", "b"], [False, False, False]))
    with pytest.raises(ValueError, match="queue: 2 anatomies, the embeddings have 1"):
        fvlm_loss(
            t([[[1.0, 0.0]]] * 2), t([[[1.0, 0.0]]] * 2), b([[True], [False]]),
            b([[True], [True]]), [["a"], ["b"]], 0.5, queue=[queued([], []), queued([], [])],
        )  # fmt: skip


def test_text_queue_keeps_the_last_usable_rows_per_anatomy_and_round_trips(tmp_path) -> None:
    queue = TextQueue(3, anatomies=2, dim=2)
    emb = torch.arange(16, dtype=torch.float32).reshape(4, 2, 2)
    normal = b([[True, False], [False, False], [True, True], [False, True]])
    usable = b([[True, True], [True, False], [True, True], [True, True]])
    texts = [[f"l{i}", f"h{i}"] for i in range(4)]
    queue.push(emb[:2], normal[:2], usable[:2], texts[:2])
    first = queue.queued()
    assert list(first[0].texts) == ["l0", "l1"] and list(first[1].texts) == ["h0"]
    queue.push(emb[2:], normal[2:], usable[2:], texts[2:])
    lung, heart = queue.queued()
    assert list(lung.texts) == ["l1", "l2", "l3"]  # l0 dropped: at most 3
    assert torch.equal(lung.emb, emb[1:, 0]) and lung.normal.tolist() == [False, True, False]
    assert list(heart.texts) == ["h0", "h2", "h3"] and torch.equal(heart.emb, emb[[0, 2, 3], 1])
    torch.save(queue.state_dict(), tmp_path / "q.pt")
    again = TextQueue(3, anatomies=2, dim=2)
    again.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    for x, y in zip(queue.queued(), again.queued(), strict=True):
        assert torch.equal(x.emb, y.emb) and torch.equal(x.normal, y.normal)
        assert list(x.texts) == list(y.texts)
    with pytest.raises(ValueError, match="size 3 for 2 anatomies"):
        TextQueue(4, anatomies=2, dim=2).load_state_dict(queue.state_dict())
    with pytest.raises(ValueError, match="text_emb"):
        queue.push(torch.zeros(1, 3, 2), normal[:1], usable[:1], texts[:1])


def test_anatomy_loss_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="texts"):
        fvlm_anatomy_loss(t(V3), t(T3), b([True, False, True]), ["a"], 0.5)
    with pytest.raises(ValueError, match="normal"):
        fvlm_anatomy_loss(t(V3), t(T3), b([True, False]), ["a", "b", "c"], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        fvlm_anatomy_loss(t(V3), t(T3), b([True, False, True]), ["a", "b", "c"], 0.5, alpha=2.0)


def _batch() -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """B = 4 samples, K = 3 anatomies, E = 2 (unit vectors at varied angles)."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 3, 2, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(4, 3, 2, generator=g, dtype=torch.float64), dim=-1)
    texts = [[f"sample {i} anatomy {k}" for k in range(3)] for i in range(4)]
    return img, txt, texts


def test_fvlm_loss_sums_only_usable_anatomies() -> None:
    img, txt, texts = _batch()
    normal = torch.zeros(4, 3, dtype=torch.bool)
    normal[:, 1] = True  # anatomy 1: all normal -> skipped
    normal[0, 0] = True
    inside = torch.ones(4, 3, dtype=torch.bool)
    inside[2, 0] = False  # sample 2 drops out of anatomy 0
    img[3, 2] = float("nan")  # sample 3 lacks anatomy 2 (encode_anatomies gives NaN)
    total, per = fvlm_loss(img, txt, normal, inside, texts, 0.5)
    assert set(per) == {0, 2}
    rows0, rows2 = [0, 1, 3], [0, 1, 2]
    l0 = fvlm_anatomy_loss(
        img[rows0, 0], txt[rows0, 0], normal[rows0, 0], [texts[i][0] for i in rows0], 0.5
    )
    l2 = fvlm_anatomy_loss(
        img[rows2, 2], txt[rows2, 2], normal[rows2, 2], [texts[i][2] for i in rows2], 0.5
    )
    assert l0 is not None and l2 is not None
    assert abs(per[0] - l0.item()) < 1e-9 and abs(per[2] - l2.item()) < 1e-9
    assert abs(total.item() - (l0 + l2).item()) < 1e-9
    assert torch.isfinite(total)


def test_fvlm_loss_backward_reaches_inputs_without_nan() -> None:
    img, txt, texts = _batch()
    img[3, 2] = float("nan")
    img.requires_grad_(True)
    txt.requires_grad_(True)
    normal = torch.zeros(4, 3, dtype=torch.bool)
    inside = torch.ones(4, 3, dtype=torch.bool)
    total, _ = fvlm_loss(img, txt, normal, inside, texts, 0.5)
    total.backward()
    assert img.grad is not None and txt.grad is not None
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    assert torch.all(img.grad[3, 2] == 0)


def test_fvlm_loss_all_skipped_is_zero_but_differentiable() -> None:
    img, txt, texts = _batch()
    img.requires_grad_(True)
    normal = torch.ones(4, 3, dtype=torch.bool)
    total, per = fvlm_loss(img, txt, normal, torch.ones(4, 3, dtype=torch.bool), texts, 0.5)
    assert per == {} and total.item() == 0.0
    total.backward()
    assert img.grad is not None and torch.all(img.grad == 0)


def test_fvlm_loss_rejects_bad_shapes() -> None:
    img, txt, texts = _batch()
    flags = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="inside"):
        fvlm_loss(img, txt, flags, flags[:, :2], texts, 0.5)
    with pytest.raises(ValueError, match="texts"):
        fvlm_loss(img, txt, flags, flags, texts[:3], 0.5)
    with pytest.raises(ValueError, match="peer_text_emb"):
        fvlm_loss(img, txt, flags, flags, texts, 0.5, peer_image_emb=img)


# -- co-teaching -----------------------------------------------------------------------------
PEER = [[0.3, -1.0, 2.0], [1.5, 0.0, -0.5], [0.2, 0.9, 0.1]]
NORMAL3 = [True, False, True]
TEXTS3 = ["clear", "mass", "unremarkable"]
Y3 = [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]


def _mixed(alpha: float, peer: list[list[float]]) -> list[list[float]]:
    sm = hand_softmax(peer)
    return [
        [alpha * y + (1 - alpha) * p for y, p in zip(yr, pr, strict=True)]
        for yr, pr in zip(Y3, sm, strict=True)
    ]


@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.5, 0.3])
def test_coteaching_targets_follow_the_formula(alpha: float) -> None:
    expected = 0.5 * (
        hand_ce(S3, _mixed(alpha, PEER)) + hand_ce(transpose(S3), _mixed(alpha, transpose(PEER)))
    )
    got = fvlm_anatomy_loss(t(V3), t(T3), b(NORMAL3), TEXTS3, 0.5, peer_logits=t(PEER), alpha=alpha)
    assert got is not None
    assert abs(got.item() - expected) < 1e-6


def test_coteaching_alpha_one_is_plain_and_alpha_zero_is_peer_softmax() -> None:
    plain = fvlm_anatomy_loss(t(V3), t(T3), b(NORMAL3), TEXTS3, 0.5)
    one = fvlm_anatomy_loss(t(V3), t(T3), b(NORMAL3), TEXTS3, 0.5, peer_logits=t(PEER), alpha=1.0)
    assert plain is not None and one is not None
    assert abs(plain.item() - one.item()) < 1e-12
    zero = fvlm_anatomy_loss(t(V3), t(T3), b(NORMAL3), TEXTS3, 0.5, peer_logits=t(PEER), alpha=0.0)
    peer_only = 0.5 * (
        hand_ce(S3, hand_softmax(PEER)) + hand_ce(transpose(S3), hand_softmax(transpose(PEER)))
    )
    assert zero is not None and abs(zero.item() - peer_only) < 1e-6


def test_coteaching_via_fvlm_loss_matches_and_keeps_peer_out_of_the_graph() -> None:
    img, txt, texts = _batch()
    peer_img, peer_txt, _ = _batch()
    peer_img = peer_img.flip(0).requires_grad_(True)
    peer_txt = peer_txt.roll(1, dims=0).requires_grad_(True)
    img.requires_grad_(True)
    normal = torch.zeros(4, 3, dtype=torch.bool)
    inside = torch.ones(4, 3, dtype=torch.bool)
    total, per = fvlm_loss(
        img,
        txt,
        normal,
        inside,
        texts,
        0.5,
        peer_image_emb=peer_img,
        peer_text_emb=peer_txt,
        peer_tau=0.25,
        alpha=0.5,
    )
    for a in range(3):
        logits = (peer_img[:, a] @ peer_txt[:, a].t() / 0.25).detach()
        ref = fvlm_anatomy_loss(
            img[:, a], txt[:, a], normal[:, a], [r[a] for r in texts], 0.5, peer_logits=logits
        )
        assert ref is not None and abs(per[a] - ref.item()) < 1e-9
    total.backward()
    assert peer_img.grad is None and peer_txt.grad is None
    assert img.grad is not None


# -- CLIP baseline ---------------------------------------------------------------------------
def test_clip_loss_matches_hand_computation() -> None:
    eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    expected = 0.5 * (hand_ce(S3, eye) + hand_ce(transpose(S3), eye))
    assert abs(clip_loss(t(V3), t(T3), 0.5).item() - expected) < 1e-6


def test_clip_image_embedding_mean_pools_projects_and_normalises() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 4)
    proj = nn.Linear(4, 3)
    out = clip_image_embedding(tokens, proj)
    assert out.shape == (2, 3)
    ref = proj(tokens.mean(dim=1))
    assert torch.allclose(out, ref / ref.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-6)
    with pytest.raises(ValueError, match="level_tokens"):
        clip_image_embedding(tokens[0], proj)


# -- distributed -----------------------------------------------------------------------------
def test_gather_is_identity_without_distributed() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    items = ["a", "b"]
    out = gather_objects(items)
    assert out == items and out is not items


def test_gather_in_a_single_rank_process_group_keeps_gradient() -> None:
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.randn(3, 2, requires_grad=True)
        y = gather_with_grad(x)
        assert torch.equal(y, x)
        (y * 2).sum().backward()
        assert x.grad is not None and torch.equal(x.grad, torch.full((3, 2), 2.0))
        flags = torch.tensor([True, False])
        assert torch.equal(gather_with_grad(flags), flags)
        assert gather_objects(["x", "y"]) == ["x", "y"]
    finally:
        dist.destroy_process_group()
