"""A model's own prompt wording: ``prompts.yaml`` beside its weights overrides the table's.

Why: a zero-shot score compares the anatomy embedding with two prompt embeddings, so a prompt
only works in words the text tower has learnt to place. The release was trained on CT-RATE
reports with a pretrained BERT and is scored with "Emphysema." / "Not Emphysema." (FVLM.md). A
model trained from scratch on a site's (or the synthetic) reports never saw "Not X.": its
normal anatomies were all trained on one sentence, the normal template ("Lung shows no
significant abnormalities."), or on the site's own phrasing. The words are the model's, not
the site's findings table's (which keeps the finding's anatomy, SR code and default threshold).
Measured with ``bench/prompt_wording.py`` on demo-recipe models: the text tower alone ranks
training reports with a finding above those without at mean AUC 0.67 with "X." / "Not X." and
0.74 with "X." / the normal template (0.49 / 0.75 for a second training run), yet the image
side on 200 held-out phantoms scores both alike, so the shipped demo keeps the release's.

File (``prompts.yaml`` in a model folder, ``<stem>.prompts.yaml`` beside a released file)::

    version: 1
    findings:
      emphysema: {negative: Lung shows no significant abnormalities.}
      cardiomegaly: {positive: Cardiomegaly., negative: Heart shows no significant abnormalities.}

A finding not listed keeps the table's prompts; an unknown finding, another key or an empty or
identical pair is a :class:`ConfigError` naming it. The SR records the prompts actually used,
and calibrated thresholds record them too (see :func:`fvlm_pacs.evaluation.write_thresholds`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..codes import FindingDefinition
from ..errors import ConfigError
from .checkpoint import resolve_model_path

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.yaml"
PROMPTS_VERSION = 1
_SIDES = ("positive", "negative")


def default_prompts_path(model_path: str | Path) -> Path:
    """``prompts.yaml`` in a model directory, ``<stem>.prompts.yaml`` beside a file."""
    p = resolve_model_path(model_path)
    return p / PROMPTS_FILE if p.is_dir() else p.parent / f"{p.stem}.{PROMPTS_FILE}"


def apply_model_prompts(
    path: Path, findings: Sequence[FindingDefinition]
) -> tuple[FindingDefinition, ...]:
    """``findings`` with the prompts of ``path`` (when it exists) in place of the table's."""
    if not path.is_file():
        return tuple(findings)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"prompts: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("findings"), dict):
        raise ConfigError(f"prompts: {path} must hold a 'findings' mapping")
    if data.get("version", PROMPTS_VERSION) != PROMPTS_VERSION:
        raise ConfigError(f"prompts: {path}: version must be {PROMPTS_VERSION}")
    by_name = {f.name: f for f in findings}
    out = dict(by_name)
    for name, node in data["findings"].items():
        where = f"prompts: {path}: findings.{name}"
        if name not in by_name:
            raise ConfigError(f"{where}: unknown finding (model scores {', '.join(by_name)})")
        if not isinstance(node, dict) or not node or set(node) - set(_SIDES):
            raise ConfigError(f"{where}: must map 'positive' and/or 'negative' to a text")
        for side, text in node.items():
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{where}.{side}: must be a non-empty text")
        changed = dataclasses.replace(by_name[name], **{k: v.strip() for k, v in node.items()})
        if changed.positive.casefold() == changed.negative.casefold():
            raise ConfigError(f"{where}: the negative prompt must differ from the positive one")
        out[name] = changed
    log.info(
        "prompts: %d finding(s) use the model's own wording from %s", len(data["findings"]), path
    )
    return tuple(out[f.name] for f in findings)


def write_model_prompts(path: Path, prompts: Mapping[str, Mapping[str, str]]) -> Path:
    """Write ``{finding: {positive?, negative?}}`` as a prompts file (what a trainer ships)."""
    doc: dict[str, Any] = {
        "version": PROMPTS_VERSION,
        "findings": {name: dict(pair) for name, pair in prompts.items()},
    }
    header = (
        "# The wording this model was trained to be scored with; overrides the prompts of\n"
        "# mappings/findings.yaml per finding (fvlm_pacs/model/model_prompts.py).\n"
    )
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), "utf-8")
    return path
