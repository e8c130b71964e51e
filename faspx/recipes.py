"""Recipes: every decision about what pruning removes and how, in one validated object, and the presets.

A recipe is frozen and checked once, where it is made (``Recipe.__post_init__``); the layer walk
(``faspx.prune``), the pair solve (``faspx.solve``) and distillation (``faspx.distill``) read it and
check nothing again. ``get_recipe`` resolves a preset name, a YAML/JSON file or a ``fasp.json``
(which records the resolved recipe of the run that wrote it), with single fields as overrides.

Measured costs of the presets on SmolLM2-135M are in ``docs/accuracy.md`` and in the README's
recipes table; ``faspx recipes`` prints that table.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from faspx.errors import UsageError

STRUCTURES = ("fasp", "mlp", "auto", "2ssp")
SELECTIONS = ("wanda", "obs", "norm")
FFN_WIDTHS = ("uniform", "per-layer")
# Tokens per distillation step: each window is cut into pieces this long, so the same tokens give more
# updates (docs/accuracy.md: 512 beat one step per 2048-token window and 256).
STEP_TOKENS = 512


@dataclass(frozen=True)
class Recipe:
    """How a model is pruned: structure, selection, restoration, FFN widths and distillation.

    ``structure``: ``fasp`` (FFN and V/O pairs at one ratio, the paper), ``mlp`` (the whole budget in
    the FFN), ``auto`` (the split that moves the last layer's output least, measured) or ``2ssp``
    (2SSP: whole attention submodules, as many as its balance ``alpha`` gives, and the rest from every
    FFN; the attention to remove is searched by perplexity on ``depth_samples`` calibration samples).
    ``selection``: ``wanda`` (the paper's structured score), ``obs`` (restoration-aware) or ``norm``
    (2SSP's: mean L2 norm of the FFN's intermediate activation). ``sequential``: statistics are taken
    with the layers before already pruned (FASP) or from the dense model (2SSP as published).
    ``restore``/``damp``/``guard``: the least-squares restoration, its relative damping (or ``auto``,
    chosen per matrix on held-out calibration samples), and whether a restoration that raises a
    layer's error is refused. ``ffn_widths``: ``uniform`` (stock) or ``per-layer`` (nemotron-nas form).
    ``distill``: calibration windows of logit distillation from the dense model after pruning (0: none).

    Example:
        >>> Recipe(structure="mlp").stock
        True
        >>> Recipe(damp=-1)
        Traceback (most recent call last):
        ...
        faspx.errors.UsageError: damp must be a number >= 0 or 'auto' (got -1)
    """

    name: str = "custom"
    structure: str = "mlp"
    selection: str = "obs"
    restore: bool = True
    damp: float | str = "auto"
    guard: bool = True
    ffn_widths: str = "uniform"
    distill: int = 16
    distill_lr: float = 1e-4
    distill_step_tokens: int = STEP_TOKENS
    sequential: bool = True
    depth_samples: int = 1
    alpha: float = 1.5

    def __post_init__(self) -> None:
        def one_of(field: str, choices: tuple[str, ...]) -> None:
            if getattr(self, field) not in choices:
                raise UsageError(f"{field} {getattr(self, field)!r} is not one of {', '.join(choices)}")

        one_of("structure", STRUCTURES)
        one_of("selection", SELECTIONS)
        one_of("ffn_widths", FFN_WIDTHS)
        damp = self.damp
        if isinstance(damp, str) and damp != "auto":
            try:
                damp = float(damp)
            except ValueError:
                raise UsageError(f"damp must be a number >= 0 or 'auto' (got {damp!r})") from None
            object.__setattr__(self, "damp", damp)
        if damp != "auto" and (isinstance(damp, bool) or not isinstance(damp, (int, float)) or damp < 0):
            raise UsageError(f"damp must be a number >= 0 or 'auto' (got {damp!r})")
        for field in ("restore", "guard", "sequential"):
            if not isinstance(getattr(self, field), bool):
                raise UsageError(f"{field} must be true or false (got {getattr(self, field)!r})")
        if isinstance(self.distill, bool) or not isinstance(self.distill, int) or self.distill < 0:
            raise UsageError(f"distill must be a whole number of windows >= 0 (got {self.distill!r})")
        if not (isinstance(self.distill_lr, (int, float)) and self.distill_lr > 0):
            raise UsageError(f"distill_lr must be > 0 (got {self.distill_lr!r})")
        if isinstance(self.distill_step_tokens, bool) or not isinstance(self.distill_step_tokens, int) \
                or self.distill_step_tokens < 1:
            raise UsageError(f"distill_step_tokens must be at least 1 (got {self.distill_step_tokens!r})")
        if isinstance(self.depth_samples, bool) or not isinstance(self.depth_samples, int) or self.depth_samples < 1:
            raise UsageError(f"depth_samples must be a whole number of calibration samples >= 1 "
                             f"(got {self.depth_samples!r})")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise UsageError(f"alpha must be a number > 0 (got {self.alpha!r})")

    @property
    def stock(self) -> bool:
        """Whether the output loads in stock transformers classes (one FFN width, every attention kept)."""
        return self.ffn_widths == "uniform" and self.structure != "2ssp"

    def with_overrides(self, **overrides) -> Recipe:
        """This recipe with some fields replaced (None values are ignored), named after what changed.

        Example:
            >>> Recipe(name="quality").with_overrides(distill=0, selection=None).name
            'quality+distill=0'
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - set(FIELDS)
        if unknown:
            raise UsageError(f"unknown recipe field(s) {', '.join(sorted(unknown))}; known: {', '.join(FIELDS)}")
        changed = {k: v for k, v in given.items() if getattr(self, k) != v}
        if not changed:
            return self
        name = changed.pop("name", None) or self.name + "+" + ",".join(f"{k}={v}" for k, v in changed.items())
        return dataclasses.replace(self, name=name, **changed)

    def to_dict(self) -> dict:
        """A JSON/YAML-ready dict; ``Recipe.from_dict`` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> Recipe:
        """A recipe from a dict with any subset of the fields (the rest default to ``quality``'s)."""
        if not isinstance(data, dict):
            raise UsageError(f"{source}: a recipe is a mapping of fields, got {type(data).__name__}")
        unknown = set(data) - set(FIELDS)
        if unknown:
            raise UsageError(f"{source}: unknown recipe field(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(FIELDS)}")
        fields = {k: v for k, v in data.items() if k != "name"}
        return dataclasses.replace(PRESETS[DEFAULT], name=data.get("name", Path(source).stem), **fields)


FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))

# Each preset with what it does; ppl/time are measured on SmolLM2-135M at s = 0.2 (128 x 2048 C4, bf16,
# WikiText-2 all 148 windows), time in units of one dense forward over the calibration tokens.
PRESETS: dict[str, Recipe] = {
    "paper": Recipe("paper", structure="fasp", selection="wanda", damp=0.01, distill=0),
    "wanda": Recipe("wanda", structure="fasp", selection="wanda", restore=False, damp=0.01, distill=0),
    "fast": Recipe("fast", structure="mlp", selection="wanda", damp=0.01, distill=0),
    "quality": Recipe("quality"),
    "max": Recipe("max", ffn_widths="per-layer"),
    "2ssp": Recipe("2ssp", structure="2ssp", selection="norm", restore=False, damp=0.01, sequential=False,
                   distill=0),
    "2ssp-quality": Recipe("2ssp-quality", structure="2ssp", depth_samples=4),
}
DESCRIPTIONS = {
    "paper": "FASP as published (V/O + FFN pairs, Wanda score, damping 0.01) with faspx's guard",
    "wanda": "structured Wanda: the paper's selection, no restoration",
    "fast": "whole budget in the FFN, Wanda score, one restoration per matrix",
    "quality": "FFN only, structured OBS, damping by measurement, 16 windows of distillation",
    "max": "quality with per-layer FFN widths: nemotron-nas form (vLLM; transformers with trust_remote_code)",
    "2ssp": "2SSP as published: FFN neurons by activation norm, whole attention submodules by perplexity "
            "(nemotron-nas form)",
    "2ssp-quality": "2SSP's structure with quality's FFN solve (OBS, restoration, damping by measurement) "
                    "and distillation (nemotron-nas form)",
}
DEFAULT = "quality"


def get_recipe(spec: str | Recipe | None = None, **overrides) -> Recipe:
    """The recipe that ``spec`` names (a preset, a .yaml/.yml/.json file, or a faspx ``fasp.json``), with overrides.

    Example:
        >>> get_recipe("paper").structure
        'fasp'
        >>> get_recipe("quality", distill=0).name
        'quality+distill=0'
    """
    if spec is None:
        spec = DEFAULT
    if isinstance(spec, Recipe):
        recipe = spec
    elif spec in PRESETS:
        recipe = PRESETS[spec]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"recipe {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                             ".yaml/.json file")
        recipe = read_recipe(path)
    return recipe.with_overrides(**overrides)


def read_recipe(path: Path) -> Recipe:
    """A recipe file: YAML or JSON fields, or a ``fasp.json`` whose ``recipe`` entry is used."""
    text = path.read_text(errors="replace")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - yaml and json raise their own error types
        raise UsageError(f"recipe file {path} could not be read: {err}") from None
    if isinstance(data, dict) and "faspx_version" in data:  # a fasp.json: the run's resolved recipe
        if not isinstance(data.get("recipe"), dict):
            raise UsageError(f"{path} records no recipe (written by an older faspx)")
        data = data["recipe"]
    return Recipe.from_dict(data, str(path))


def table(rows: dict[str, dict] | None = None) -> list[dict]:
    """One row per preset: name, stock or not, what it does, and its measured figures (docs/accuracy.md)."""
    rows = rows or MEASURED
    return [{"name": name, "stock": recipe.stock, "what": DESCRIPTIONS[name], **rows.get(name, {})}
            for name, recipe in PRESETS.items()]


# What each preset measured on SmolLM2-135M: WikiText-2 perplexity (148 windows of 2048, bf16) at
# s = 0.2 and 0.3 (2ssp recipes: 0.25 and 0.375, the paper's rates) after pruning with 128 x 2048 C4
# tokens, and the prune + distillation time in units of one dense forward over those tokens (the
# 2ssp rows' times were taken on machines shared with other runs: docs/accuracy.md, not here). Each
# figure is a row of a file in benchmarks/results/ (tests/test_recipes.py checks that it is);
# docs/accuracy.md gives the commands. Absent: not measured.
MEASURED: dict[str, dict[str, float]] = {
    "paper": {"ppl_0.2": 42.32, "ppl_0.3": 61.58},
    "wanda": {"ppl_0.2": 51.50},
    "fast": {"ppl_0.2": 37.18, "time_x": 1.30},
    "quality": {"ppl_0.2": 32.87, "ppl_0.25": 36.75, "ppl_0.3": 42.14, "ppl_0.375": 50.82, "time_x": 2.26},
    "max": {},
    "2ssp": {"ppl_0.25": 51.28, "ppl_0.375": 113.53},
    "2ssp-quality": {"ppl_0.25": 36.70, "ppl_0.375": 50.32},
}
