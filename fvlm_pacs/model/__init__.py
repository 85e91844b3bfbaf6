"""fVLM model: encoders, anatomy pooling, zero-shot scoring and checkpoint formats.

Public API: :class:`FvlmModel` (``from_checkpoint``, ``encode_anatomies``, ``encode_text``,
``temperature``, ``anatomies``), :func:`save_model`, :func:`import_official`,
:class:`CheckpointError`, :class:`ModelConfig` (+ ``vit_b``/``tiny`` presets) and the scoring
functions of :mod:`fvlm_pacs.model.zeroshot`.
"""

from __future__ import annotations

from .checkpoint import CheckpointError, import_official, load_model, save_model
from .config import ModelConfig, TextConfig, VisionConfig, tiny, vit_b
from .fvlm import FvlmModel
from .predictor import Prediction, Predictor
from .prompts import PromptBank
from .zeroshot import pair_score, score_findings

__all__ = [
    "CheckpointError",
    "FvlmModel",
    "ModelConfig",
    "Prediction",
    "Predictor",
    "PromptBank",
    "TextConfig",
    "VisionConfig",
    "import_official",
    "load_model",
    "pair_score",
    "save_model",
    "score_findings",
    "tiny",
    "vit_b",
]
