"""Zero-shot scoring of a finding from its anatomy embedding and a positive/negative prompt pair.

score = softmax([v·t_neg, v·t_pos] / τ)[1] = sigmoid((cos_pos − cos_neg) / τ), with v the
finding's own anatomy embedding and t the cached prompt embeddings (all L2-normalised). A NaN
anatomy embedding (anatomy absent) yields a NaN score, which the caller must report as "not
assessable" — never as 0. Scores are not probabilities across findings: each finding needs its
own calibrated threshold (FVLM.md).
"""

from __future__ import annotations

import torch


def pair_score(
    anatomy_embedding: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Score of one prompt pair. Shapes broadcast over the last (embedding) axis.

    Computed as the two-way softmax of the release, which equals sigmoid of the scaled cosine
    difference; NaN in ``anatomy_embedding`` propagates to the result.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = torch.stack(
        [(anatomy_embedding * negative).sum(-1), (anatomy_embedding * positive).sum(-1)], dim=-1
    )
    return torch.softmax(logits / temperature, dim=-1)[..., 1]


def score_findings(
    anatomy_embeddings: torch.Tensor,
    anatomy_index: torch.Tensor | list[int],
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Scores [B, F] for F findings.

    ``anatomy_embeddings`` [B, K, E] from ``FvlmModel.encode_anatomies``; ``anatomy_index`` [F]
    says which anatomy each finding belongs to; ``positives``/``negatives`` [F, E] are the prompt
    embeddings. Only the finding's own anatomy embedding is used.
    """
    index = torch.as_tensor(anatomy_index, dtype=torch.long, device=anatomy_embeddings.device)
    if positives.shape != negatives.shape or positives.shape[0] != index.shape[0]:
        raise ValueError(
            f"positives {tuple(positives.shape)}, negatives {tuple(negatives.shape)} and "
            f"anatomy_index ({index.shape[0]}) must agree on the number of findings"
        )
    v = anatomy_embeddings[:, index]  # [B, F, E]
    return pair_score(v, positives.unsqueeze(0), negatives.unsqueeze(0), temperature)
