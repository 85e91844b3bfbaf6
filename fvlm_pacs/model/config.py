"""Frozen configuration of the fVLM network (image encoder, text encoder, anatomy pooling).

One object describes every dimension the weights depend on, so a checkpoint can carry it in its
``config.json`` and rebuild the exact network without guessing. ``vit_b()`` is the released
CT-RATE configuration (FVLM.md); ``tiny()`` is a few-megabyte variant for tests and the demo.

Image axes are (D, H, W) = (slices, rows, columns) throughout: the nominal input (112, 256, 352)
and the patch (16, 16, 32) apply in that order, giving a 7 x 16 x 11 token grid.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, get_type_hints

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: Anatomies of the released CT-RATE weights, in index order (mask label - 1).
RELEASED_ANATOMIES: tuple[str, ...] = ("lung", "heart", "esophagus", "aorta")


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    """Coerce a JSON list to a 3-tuple of positive ints; the error names the field."""
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be three integers, got {value!r}") from exc
    if len(out) != 3 or any(v <= 0 for v in out):
        raise ConfigError(f"{name} must be three positive integers, got {value!r}")
    return (out[0], out[1], out[2])


RELEASED_HU_WINDOW = (-1150.0, 350.0)
"""The release's one intensity window (FVLM.md): HU clipped to it and scaled to [0, 1]."""


def _windows(value: Any) -> tuple[tuple[float, float], ...]:
    try:
        out = tuple((float(low), float(high)) for low, high in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"vision.hu_windows must be a list of [low, high] HU pairs, got {value!r}"
        ) from exc
    if not out:
        raise ConfigError("vision.hu_windows must name at least one window")
    for low, high in out:
        if not RELEASED_HU_WINDOW[0] <= low < high:
            raise ConfigError(
                f"vision.hu_windows: [{low}, {high}] must have "
                f"{RELEASED_HU_WINDOW[0]} <= low < high (HU)"
            )
    return out


def _edges(value: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(e) for e in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"histogram_edges must be a list of HU values, got {value!r}") from exc
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ConfigError(f"histogram_edges must increase strictly, got {list(out)}")
    return out


@dataclass(frozen=True)
class VisionConfig:
    """3D ViT in MONAI naming. ``level_blocks`` are the 0-based blocks whose residual stream is
    exposed as a token level (the final normed output is always the last level).

    ``hu_windows`` are the (low, high) HU windows the image is clipped to, one input channel each
    (see :mod:`fvlm_pacs.model.intensity`); ``in_channels`` must equal their number. The
    release has one, [−1150, 350]; a window may not start below −1150 HU, the input's floor.

    ``stem_strides`` / ``stem_channels`` choose how a patch becomes a token. Empty (the release):
    one linear patchify convolution, kernel = stride = ``patch_size``. Otherwise a hierarchical
    stem (:class:`~fvlm_pacs.model.vit.HierarchicalStem`): one non-overlapping patchify stage per
    stride, each but the last followed by LayerNorm + GELU and of width ``stem_channels[i]``, the
    last of width ``hidden_size``; the strides multiply to ``patch_size`` along each axis, so the
    token grid, the position embedding and the anatomy selector stay the same.
    """

    in_channels: int = 1
    patch_size: tuple[int, int, int] = (16, 16, 32)
    img_size: tuple[int, int, int] = (112, 256, 352)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = False
    layer_norm_eps: float = 1e-5
    level_blocks: tuple[int, ...] = (3, 6, 9)
    hu_windows: tuple[tuple[float, float], ...] = (RELEASED_HU_WINDOW,)
    stem_strides: tuple[tuple[int, int, int], ...] = ()
    stem_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "hu_windows", _windows(self.hu_windows))
        object.__setattr__(
            self,
            "stem_strides",
            tuple(_triple(s, f"vision.stem_strides[{i}]") for i, s in enumerate(self.stem_strides)),
        )
        object.__setattr__(self, "stem_channels", tuple(int(c) for c in self.stem_channels))
        if self.in_channels != len(self.hu_windows):
            raise ConfigError(
                f"vision.in_channels ({self.in_channels}) must equal the number of "
                f"vision.hu_windows ({len(self.hu_windows)}): one channel per window"
            )
        object.__setattr__(self, "patch_size", _triple(self.patch_size, "vision.patch_size"))
        object.__setattr__(self, "img_size", _triple(self.img_size, "vision.img_size"))
        object.__setattr__(self, "level_blocks", tuple(int(b) for b in self.level_blocks))
        if self.hidden_size <= 0 or self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision.hidden_size ({self.hidden_size}) must be a positive multiple of "
                f"vision.num_heads ({self.num_heads})"
            )
        for img, patch, axis in zip(self.img_size, self.patch_size, "DHW", strict=True):
            if img % patch:
                raise ConfigError(
                    f"vision.img_size along {axis} ({img}) must be a multiple of "
                    f"vision.patch_size ({patch})"
                )
        self._check_stem()
        if any(not 0 <= b < self.num_layers for b in self.level_blocks):
            raise ConfigError(
                f"vision.level_blocks {self.level_blocks} must index blocks 0..{self.num_layers - 1}"
            )

    def _check_stem(self) -> None:
        if not self.stem_strides:
            if self.stem_channels:
                raise ConfigError("vision.stem_channels needs vision.stem_strides")
            return
        if len(self.stem_channels) != len(self.stem_strides) - 1:
            raise ConfigError(
                f"vision.stem_channels needs one width per stem stage but the last "
                f"({len(self.stem_strides) - 1}), got {len(self.stem_channels)}"
            )
        if any(c <= 0 for c in self.stem_channels):
            raise ConfigError(f"vision.stem_channels must be positive, got {self.stem_channels}")
        total = tuple(math.prod(s[a] for s in self.stem_strides) for a in range(3))
        if total != self.patch_size:
            raise ConfigError(
                f"vision.stem_strides multiply to {total}, not to vision.patch_size "
                f"{self.patch_size}"
            )

    @property
    def grid(self) -> tuple[int, int, int]:
        """Nominal token grid (D', H', W') the learned position embedding is stored on."""
        d, h, w = (i // p for i, p in zip(self.img_size, self.patch_size, strict=True))
        return (d, h, w)


TEXT_POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class TextConfig:
    """BERT text encoder (Hugging Face naming) without token-type embedding and pooler.

    ``pooling`` picks what ``text_proj`` reads: ``cls`` (the release: the last layer's [CLS]) or
    ``mean`` (the mean of the last layer over the real tokens). A randomly initialised BERT's
    [CLS] output is almost the same vector for every text (measured: cosine 1.000 between
    "Emphysema." and "Lung shows no significant abnormalities." with the tiny config), so
    contrastive training from scratch starts with no text signal and collapses; the token mean
    differs between texts from the first step (cosines 0.6–0.9). Pretrained encoders keep ``cls``.
    ``dropout`` is BERT's hidden and attention dropout during training (Hugging Face's default
    0.1); inference runs in eval mode, where it does nothing.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    max_tokens: int = 384
    pooling: str = "cls"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"text.dropout must be in [0, 1), got {self.dropout}")
        if self.pooling not in TEXT_POOLINGS:
            raise ConfigError(f"text.pooling must be one of {TEXT_POOLINGS}, got {self.pooling!r}")
        if self.hidden_size <= 0 or self.hidden_size % self.num_heads:
            raise ConfigError(
                f"text.hidden_size ({self.hidden_size}) must be a positive multiple of "
                f"text.num_heads ({self.num_heads})"
            )
        if not 0 < self.max_tokens <= self.max_position_embeddings:
            raise ConfigError(
                f"text.max_tokens ({self.max_tokens}) must be in 1..max_position_embeddings "
                f"({self.max_position_embeddings})"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Everything the fVLM weights depend on. ``anatomies`` are in index order: label k in the
    label map (1-based) is ``anatomies[k - 1]``.

    ``histogram_edges`` (HU, strictly increasing) switch on the anatomy HU histograms of
    :mod:`~fvlm_pacs.model.histogram` — an MLP of ``histogram_hidden`` units per anatomy whose
    output joins the pooled token embedding; empty (the release, and every model made before
    them) means no histogram weights and the release's computation. ``histogram_shell`` (voxels,
    0 = off) adds the histogram of the anatomy's surroundings — voxels within that many voxels
    of it along each axis that belong to none of the model's anatomies — and
    ``histogram_volume`` the anatomy's voxel count; ``histogram_lesions`` the anatomy's counts
    of round and elongated dense blobs by size (:mod:`~fvlm_pacs.model.lesions`: nodules,
    fibrotic bands); all three need ``histogram_edges``.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    anatomies: tuple[str, ...] = RELEASED_ANATOMIES
    pool_heads: int = 4
    pool_dropout: float = 0.1
    temperature_init: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    histogram_edges: tuple[float, ...] = ()
    histogram_hidden: int = 64
    histogram_shell: int = 0
    histogram_volume: bool = False
    histogram_lesions: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "anatomies", tuple(str(a) for a in self.anatomies))
        object.__setattr__(self, "histogram_edges", _edges(self.histogram_edges))
        if self.histogram_hidden <= 0:
            raise ConfigError(f"histogram_hidden must be positive, got {self.histogram_hidden}")
        if self.histogram_shell < 0:
            raise ConfigError(f"histogram_shell must be >= 0 voxels, got {self.histogram_shell}")
        extras = self.histogram_shell or self.histogram_volume or self.histogram_lesions
        if extras and not self.histogram_edges:
            raise ConfigError(
                "histogram_shell, histogram_volume and histogram_lesions need histogram_edges"
            )
        if not self.anatomies:
            raise ConfigError("anatomies must name at least one anatomy")
        if len(set(self.anatomies)) != len(self.anatomies):
            raise ConfigError(f"anatomies must be unique, got {self.anatomies}")
        if self.vision.hidden_size % self.pool_heads:
            raise ConfigError(
                f"pool_heads ({self.pool_heads}) must divide vision.hidden_size "
                f"({self.vision.hidden_size})"
            )
        if not 0 < self.temperature_min <= self.temperature_max:
            raise ConfigError("temperature_min must be > 0 and <= temperature_max")
        if self.embed_dim <= 0:
            raise ConfigError(f"embed_dim must be positive, got {self.embed_dim}")

    # -- JSON round trip ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error so typos do not pass silently."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be an object, got {type(data).__name__}")
        top = {f.name for f in fields(cls)}
        unknown = set(data) - top
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        kwargs: dict[str, Any] = coerce_numbers(
            cls, {k: v for k, v in data.items() if k not in ("vision", "text")}, "model"
        )
        if "anatomies" in kwargs:
            kwargs["anatomies"] = tuple(kwargs["anatomies"])
        kwargs["vision"] = _sub(VisionConfig, data.get("vision", {}), "vision")
        kwargs["text"] = _sub(TextConfig, data.get("text", {}), "text")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def coerce_numbers(kind: type[Any], data: dict[str, Any], name: str) -> dict[str, Any]:
    """``data`` with every value of a ``float`` or ``int`` field of dataclass ``kind`` checked
    and converted.

    YAML 1.1 (PyYAML) reads ``1e-4`` — an exponent without a dot — as the STRING "1e-4", and a
    training or model config written by hand is full of such learning rates and epsilons; JSON
    numbers like ``1`` arrive as ints, ``1e3`` as a float. Float fields take any number; int
    fields take whole numbers only (``steps: 1e3`` is 1000, ``batch_size: 2.5`` is refused).
    Anything else is a :class:`ConfigError` naming the key, instead of a type error deep inside
    torch or transformers.
    """
    hints = get_type_hints(kind)
    out = dict(data)
    for key, value in data.items():
        hint = hints.get(key)
        want = (
            float if hint in (float, float | None) else int if hint in (int, int | None) else None
        )
        if want is None or value is None:
            continue
        number: float | None = None
        if not isinstance(value, bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = None
        if number is None or (want is int and not number.is_integer()):
            kind_txt = "a whole number" if want is int else "a number"
            raise ConfigError(f"{name}.{key}: expected {kind_txt}, got {value!r}")
        out[key] = want(number) if want is float or not isinstance(value, int) else value
    return out


def _sub(kind: type[Any], data: Any, name: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be an object, got {type(data).__name__}")
    known = {f.name for f in fields(kind)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown {name} config keys: {sorted(unknown)}")
    return kind(**coerce_numbers(kind, data, name))


def vit_b(anatomies: tuple[str, ...] = RELEASED_ANATOMIES) -> ModelConfig:
    """The released CT-RATE configuration: ViT-B/3D + BERT-base, 256-d joint space."""
    return ModelConfig(anatomies=anatomies)


HMLP_STEM_STRIDES: tuple[tuple[int, int, int], ...] = ((2, 4, 4), (2, 2, 2), (2, 2, 2), (2, 1, 2))
"""A hierarchical stem for the (16, 16, 32) patch: 2·4·4 = 32 voxels per first-stage input,
then 2×2×2 merges, the last stage merging pairs along D and W (``vision.stem_strides``)."""

HMLP_STEM_CHANNELS: tuple[int, ...] = (16, 32, 64)
"""Widths of the first three stages of :data:`HMLP_STEM_STRIDES` (``vision.stem_channels``)."""


def tiny(
    anatomies: tuple[str, ...] = RELEASED_ANATOMIES,
    vocab_size: int = 64,
    hu_windows: tuple[tuple[float, float], ...] = (RELEASED_HU_WINDOW,),
    *,
    hierarchical_stem: bool = False,
) -> ModelConfig:
    """A few-megabyte network with the same key names as ``vit_b()``, for tests and the demo.
    ``hu_windows`` are its input channels (one each); ``hierarchical_stem`` replaces the linear
    patchify convolution by :data:`HMLP_STEM_STRIDES` / :data:`HMLP_STEM_CHANNELS`.

    Nominal image (32, 32, 64) with patch (16, 16, 32) gives a 2 x 2 x 2 grid; 4 ViT blocks so
    that levels after blocks 1, 2, 3 exist (level_blocks are rescaled to the shallower net).
    The text tower mean-pools its tokens: it is always trained from scratch (see ``TextConfig``).
    """
    return ModelConfig(
        vision=VisionConfig(
            in_channels=len(hu_windows),
            hu_windows=hu_windows,
            img_size=(32, 32, 64),
            hidden_size=64,
            num_layers=4,
            num_heads=4,
            mlp_dim=128,
            level_blocks=(1, 2, 3),
            stem_strides=HMLP_STEM_STRIDES if hierarchical_stem else (),
            stem_channels=HMLP_STEM_CHANNELS if hierarchical_stem else (),
        ),
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            max_tokens=64,
            pooling="mean",
        ),
        embed_dim=16,
        anatomies=anatomies,
    )
