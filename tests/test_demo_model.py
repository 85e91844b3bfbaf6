"""The demo models shipped in the package: present, small, self-consistent, loadable by name.

`--model demo` is what the README's first command runs, so a missing file, thresholds calibrated
for other weights or a card that lost its caveat must fail here, not in front of a newcomer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from fvlm_pacs.codes import load_anatomies
from fvlm_pacs.model.checkpoint import demo_model_dir, read_meta, resolve_model_path, sha256_file
from fvlm_pacs.model.config import ModelConfig
from fvlm_pacs.model.predictor import Predictor
from fvlm_pacs.segmentation import make_provider
from fvlm_pacs.segmentation.builtin import SegNetConfig

DEMO = demo_model_dir()
SIZE_LIMIT = 30 * 1024 * 1024  # the budget for both demo networks together


def test_the_name_demo_resolves_to_the_shipped_folder() -> None:
    assert resolve_model_path("demo") == DEMO
    assert resolve_model_path("./demo") == Path("./demo")  # a real folder called demo


def test_files_are_complete_small_and_packaged() -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "thresholds.json",
        "prompt_bank.safetensors",
        "MODEL_CARD.md",
        "eval.json",
        "segmentation/config.json",
    ):
        assert (DEMO / name).is_file(), name
    files = [p for p in DEMO.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= SIZE_LIMIT
    # every shipped file is matched by setup.py's package_data patterns
    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text(encoding="utf-8")
    patterns = re.findall(r'"(models/demo[^"]*)"', setup)
    for path in files:
        rel = path.relative_to(DEMO.parent.parent).as_posix()
        assert any(Path(rel).match(p) for p in patterns), f"{rel} is not in package_data"


def test_weights_card_and_thresholds_agree() -> None:
    meta = read_meta(DEMO)
    assert meta["sha256"] == sha256_file(DEMO / "model.safetensors")
    thresholds = json.loads((DEMO / "thresholds.json").read_text(encoding="utf-8"))
    assert thresholds["model_sha256"] == meta["sha256"]  # calibrated for exactly these weights
    card = (DEMO / "MODEL_CARD.md").read_text(encoding="utf-8")
    mean = json.loads((DEMO / "eval.json").read_text(encoding="utf-8"))["mean_auc"]
    caveat = next(line for line in card.splitlines() if line.startswith("caveat:"))
    assert "NOT for clinical use" in caveat and f"{mean:.3f}" in caveat


def test_predictor_loads_by_name_without_the_text_tower() -> None:
    predictor = Predictor("demo", device="cpu")
    assert predictor.info.name == "fvlm-demo"
    assert predictor.model.text_encoder is None  # the shipped prompt bank is warm
    assert len(predictor.findings) == 16


@pytest.mark.parametrize("profile", ["ct-rate"])
def test_builtin_segmentation_network_loads_from_the_package(profile: str) -> None:
    provider = make_provider("builtin", load_anatomies(profile))
    assert provider.name == "builtin"


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list:
    """The recipes ``build-demo`` commands hand to ``build_demo`` (patched: nothing is built)."""
    from fvlm_pacs.model import demo_build

    recipes: list[demo_build.DemoRecipe] = []

    def fake_build(recipe: demo_build.DemoRecipe, work: Path, out: Path | None) -> Path:
        recipes.append(recipe)
        (tmp_path / demo_build.EVAL_FILE).write_text('{"mean_auc": 0.5}', encoding="utf-8")
        return tmp_path

    monkeypatch.setattr(demo_build, "build_demo", fake_build)
    return recipes


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"lesion_counts": False, "seg_extra_windows": ((-100.0, 150.0), (-1000.0, -500.0))},
        {"histograms": False, "histogram_context": False, "lesion_counts": False},
        {
            "whole_text_anatomies": (),
            "negative_prompts": "text-selected",
            "positive_prompts": "table",
        },
        {"hierarchical_stem": False, "sentence_keep": 1.0, "seg_steps": 0, "heldout_cases": 0},
    ],
)
def test_the_cards_rebuild_line_builds_its_recipe(
    changes: dict, seen: list, tmp_path: Path
) -> None:
    """The card's rebuild line, run as written, gives back the recipe it was written for — also
    where a default moved (lesion counts) or a value starts with '-' (a HU window)."""
    import shlex

    from fvlm_pacs.cli import main
    from fvlm_pacs.model import demo_build

    recipe = demo_build.DemoRecipe(**changes)
    words = shlex.split(demo_build.rebuild_command(recipe))
    assert words[:3] == ["fvlm-pacs", "model", "build-demo"]
    assert main([*words[1:], "--work", str(tmp_path / "w")]) == 0
    assert seen == [recipe]


def test_build_demo_command_uses_the_recipe_defaults(seen: list, tmp_path: Path) -> None:
    from fvlm_pacs.cli import main
    from fvlm_pacs.model import demo_build

    assert main(["model", "build-demo", "--work", str(tmp_path / "w")]) == 0
    assert main(["model", "build-demo", "--steps", "7", "--work", str(tmp_path / "w")]) == 0
    assert main(["model", "build-demo", "--stem", "patch", "--work", str(tmp_path)]) == 0
    assert main(["model", "build-demo", "--histograms", "off", "--work", str(tmp_path)]) == 0
    context = ["--histogram-context", "off", "--work", str(tmp_path)]
    assert main(["model", "build-demo", *context]) == 0
    keep = ["--sentence-keep", "1", "--work", str(tmp_path)]
    assert main(["model", "build-demo", *keep]) == 0
    lesions = ["--lesion-counts", "off", "--work", str(tmp_path)]
    assert main(["model", "build-demo", *lesions]) == 0
    on = ["--lesion-counts", "on", "--histograms", "off", "--work", str(tmp_path)]
    assert main(["model", "build-demo", *on]) == 2
    soft = ["--seg-extra-windows=-100:150", "--work", str(tmp_path)]
    assert main(["model", "build-demo", *soft]) == 0
    assert main(["model", "build-demo", "--seg-extra-windows", "-100", *soft[1:]]) == 2
    assert main(["model", "build-demo", "--seg-extra-windows=150:-100", *soft[1:]]) == 2
    assert main(["model", "build-demo", "--sentence-keep", "0", "--work", str(tmp_path)]) == 2
    whole = ["--whole-text-anatomies", "heart,aorta", "--work", str(tmp_path)]
    assert main(["model", "build-demo", *whole]) == 0
    none = ["--whole-text-anatomies", "none", "--positive-prompts", "report-sentences"]
    assert main(["model", "build-demo", *none, "--work", str(tmp_path)]) == 0
    liver = ["--whole-text-anatomies", "liver", "--work", str(tmp_path)]
    assert main(["model", "build-demo", *liver]) == 2
    release = ["--positive-prompts", "report-sentences", "--negative-prompts", "release"]
    assert main(["model", "build-demo", *release, "--work", str(tmp_path)]) == 2
    # other negatives alone fall back to the table's positives (chosen on images only)
    assert main(["model", "build-demo", "--negative-prompts", "text-selected", *whole[2:]]) == 0
    assert seen[0] == demo_build.DemoRecipe()
    assert seen[1] == demo_build.DemoRecipe(steps=7)
    assert seen[2] == demo_build.DemoRecipe(hierarchical_stem=False)
    assert seen[3] == demo_build.DemoRecipe(
        histograms=False, histogram_context=False, lesion_counts=False
    )
    assert seen[4] == demo_build.DemoRecipe(histogram_context=False)
    assert seen[5] == demo_build.DemoRecipe(sentence_keep=1.0)
    assert seen[6] == demo_build.DemoRecipe(lesion_counts=False)
    assert seen[7] == demo_build.DemoRecipe(seg_extra_windows=((-100.0, 150.0),))
    assert seen[8] == demo_build.DemoRecipe(whole_text_anatomies=("heart", "aorta"))
    assert seen[9] == demo_build.DemoRecipe(
        whole_text_anatomies=(), positive_prompts="report-sentences"
    )
    assert seen[10] == demo_build.DemoRecipe(
        negative_prompts="text-selected", positive_prompts="table"
    )
    # refused before: lesion counts without histograms, a window without its high end or
    # upside down, sentence_keep 0, liver, positives with release negatives
    assert len(seen) == 11
    # the shipped model is what the default recipe builds: its card's rebuild line, version
    # and network are the defaults'
    card = (DEMO / "MODEL_CARD.md").read_text(encoding="utf-8")
    recipe = demo_build.DemoRecipe()
    rebuild = next(
        line for line in card.splitlines() if line.startswith("fvlm-pacs model build-demo")
    )
    assert f"--steps {recipe.steps} " in rebuild and f"--cases {recipe.cases} " in rebuild
    assert f"--seed {recipe.seed} " in rebuild
    assert f"--negative-prompts {recipe.negative_prompts} " in rebuild
    assert ("--stem hierarchical" in rebuild) == recipe.hierarchical_stem
    assert ("--histograms on" in rebuild) == recipe.histograms
    assert ("--histogram-context on" in rebuild) == recipe.histogram_context
    assert f"--lesion-counts {'on' if recipe.lesion_counts else 'off'} " in rebuild
    assert ("--seg-extra-windows" in rebuild) == bool(recipe.seg_extra_windows)
    # cards before the option trained on whole texts, which is the default's 1
    assert f"--sentence-keep {recipe.sentence_keep:g} " in rebuild or (
        "--sentence-keep" not in rebuild and recipe.sentence_keep == 1.0
    )
    # cards before these options had neither: whole texts nowhere, the table's positives
    whole_texts = ",".join(recipe.whole_text_anatomies) or "none"
    assert f"--whole-text-anatomies {whole_texts} " in rebuild or (
        "--whole-text-anatomies" not in rebuild and not recipe.whole_text_anatomies
    )
    assert f"--positive-prompts {recipe.positive_prompts} " in rebuild or (
        "--positive-prompts" not in rebuild and recipe.positive_prompts == "table"
    )
    meta = read_meta(DEMO)
    assert meta["version"] == recipe.version
    shipped = ModelConfig.from_dict(meta["model"])
    assert bool(shipped.vision.stem_strides) == recipe.hierarchical_stem
    assert bool(shipped.histogram_edges) == recipe.histograms
    assert (shipped.histogram_shell == demo_build.CONTEXT_SHELL) == recipe.histogram_context
    assert shipped.histogram_volume == recipe.histogram_context
    assert shipped.histogram_lesions == recipe.lesion_counts
    seg_meta = json.loads((DEMO / "segmentation" / "config.json").read_text(encoding="utf-8"))
    network = SegNetConfig.from_dict(seg_meta["network"])
    assert network.extra_windows == recipe.seg_extra_windows


def test_recipe_model_is_tiny_with_the_chosen_width() -> None:
    """Without stem and histograms the recipe trains exactly ``tiny()``; ``vit_width`` changes
    only the ViT width, ``hu_windows`` only the input channels, ``hierarchical_stem`` only the
    patchify, ``histograms`` only the histogram edges, and the vocabulary size is left to the
    trainer's tokenizer."""
    from fvlm_pacs.errors import ConfigError
    from fvlm_pacs.model import demo_build
    from fvlm_pacs.model.config import ModelConfig, tiny
    from fvlm_pacs.model.histogram import HISTOGRAM_EDGES
    from fvlm_pacs.model.intensity import FOUR_WINDOWS

    default = demo_build.DemoRecipe(
        hierarchical_stem=False, histograms=False, histogram_context=False, lesion_counts=False
    ).model_config()
    assert "vocab_size" not in default["text"]
    text = {**default["text"], "vocab_size": 317}
    assert ModelConfig.from_dict({**default, "text": text}) == tiny(vocab_size=317)
    four = demo_build.DemoRecipe(
        hu_windows=FOUR_WINDOWS,
        hierarchical_stem=False,
        histograms=False,
        histogram_context=False,
        lesion_counts=False,
    ).model_config()
    got = ModelConfig.from_dict({**four, "text": text})
    assert got.vision.hu_windows == FOUR_WINDOWS and got.vision.in_channels == 4
    assert got == tiny(vocab_size=317, hu_windows=FOUR_WINDOWS)
    # stem + histograms + surroundings + lesion counts
    shipped = demo_build.DemoRecipe().model_config()
    assert ModelConfig.from_dict({**shipped, "text": text}) == dataclasses.replace(
        tiny(vocab_size=317, hierarchical_stem=True),
        histogram_edges=HISTOGRAM_EDGES,
        histogram_shell=demo_build.CONTEXT_SHELL,
        histogram_volume=True,
        histogram_lesions=True,
    )
    hist = demo_build.DemoRecipe(
        hierarchical_stem=False, histogram_context=False, lesion_counts=False
    ).model_config()
    assert ModelConfig.from_dict({**hist, "text": text}) == dataclasses.replace(
        tiny(vocab_size=317), histogram_edges=HISTOGRAM_EDGES
    )
    context = demo_build.DemoRecipe(
        hierarchical_stem=False, histogram_context=True, lesion_counts=False
    ).model_config()
    assert ModelConfig.from_dict({**context, "text": text}) == dataclasses.replace(
        tiny(vocab_size=317),
        histogram_edges=HISTOGRAM_EDGES,
        histogram_shell=demo_build.CONTEXT_SHELL,
        histogram_volume=True,
    )
    with pytest.raises(ConfigError, match="need histogram_edges"):  # before any phantom
        demo_build.DemoRecipe(histograms=False, histogram_context=True, lesion_counts=False)
    plain = demo_build.DemoRecipe(lesion_counts=False).model_config()
    assert ModelConfig.from_dict({**plain, "text": text}) == dataclasses.replace(
        ModelConfig.from_dict({**shipped, "text": text}), histogram_lesions=False
    )
    with pytest.raises(ConfigError, match="lesion_counts .* needs histograms"):
        demo_build.DemoRecipe(histograms=False, histogram_context=False, lesion_counts=True)
    wide = demo_build.DemoRecipe(
        vit_width=192,
        hierarchical_stem=False,
        histograms=False,
        histogram_context=False,
        lesion_counts=False,
    ).model_config()
    assert wide["vision"]["hidden_size"] == 192 and wide["vision"]["mlp_dim"] == 384
    assert {k: v for k, v in wide.items() if k != "vision"} == {
        k: v for k, v in default.items() if k != "vision"
    }


def test_recipe_objective_is_checked_before_any_work() -> None:
    from fvlm_pacs.errors import ConfigError
    from fvlm_pacs.model import demo_build

    assert demo_build.DemoRecipe(objective="fvlm-coteach").objective == "fvlm-coteach"
    with pytest.raises(ConfigError, match="objective"):
        demo_build.DemoRecipe(objective="clip")
    with pytest.raises(ConfigError):
        demo_build.DemoRecipe(vit_width=30)  # not a multiple of the 4 heads
    # the card's independent phantoms must not be training phantoms
    with pytest.raises(ConfigError, match="overlap the held-out block"):
        demo_build.DemoRecipe(seed=99_990, cases=20)
    assert demo_build.DemoRecipe(seed=99_990, cases=20, heldout_cases=0).heldout_cases == 0


def test_recipe_sentence_keep_reaches_the_training_run(tmp_path: Path) -> None:
    """The recipe's ``sentence_keep`` is the training run's (1: whole texts, FVLM.md's training;
    the shipped recipe's 0.5), and an impossible probability fails before any phantom is
    written."""
    from fvlm_pacs.errors import ConfigError
    from fvlm_pacs.model import demo_build

    manifest = tmp_path / "manifest.csv"
    default = demo_build.training_config(demo_build.DemoRecipe(), manifest, tmp_path)
    assert default.sentence_keep == 0.5
    whole = demo_build.DemoRecipe(sentence_keep=1.0)
    assert demo_build.training_config(whole, manifest, tmp_path).sentence_keep == 1.0
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="sentence_keep"):
            demo_build.DemoRecipe(sentence_keep=bad)
