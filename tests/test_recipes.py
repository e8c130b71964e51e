"""faspx.recipes: one validated object, the presets, and reading a recipe from a file or a fasp.json."""

import json

import pytest

from faspx.errors import UsageError
from faspx.recipes import DEFAULT, FIELDS, PRESETS, Recipe, get_recipe, table


def test_every_preset_is_valid_and_named_after_itself():
    assert set(PRESETS) >= {"paper", "wanda", "fast", "quality", "max"} and DEFAULT == "quality"
    for name, recipe in PRESETS.items():
        assert recipe.name == name and Recipe(**recipe.to_dict()) == recipe
    assert [name for name, r in PRESETS.items() if not r.stock] == ["max", "2ssp", "2ssp-quality"]


def test_paper_is_fasp_as_published_with_the_guard():
    paper = PRESETS["paper"]
    assert (paper.structure, paper.selection, paper.restore, paper.damp, paper.guard, paper.distill) == \
        ("fasp", "wanda", True, 0.01, True, 0)
    assert not PRESETS["wanda"].restore


@pytest.mark.parametrize("field, value, message", [
    ("structure", "deep", "structure"), ("selection", "magic", "selection"), ("damp", -1, "damp"),
    ("damp", "lots", "damp"), ("ffn_widths", "ragged", "ragged"), ("distill", -2, "distill"),
    ("distill_lr", 0, "distill_lr"), ("distill_step_tokens", 0, "at least 1"), ("restore", "yes", "true or false"),
])
def test_bad_values_are_usage_errors_where_the_recipe_is_made(field, value, message):
    with pytest.raises(UsageError, match=message):
        Recipe(**{field: value})
    with pytest.raises(UsageError, match=message):
        get_recipe("quality", **{field: value})


def test_overrides_name_what_changed_and_none_changes_nothing():
    assert get_recipe("quality", distill=None) is PRESETS["quality"]
    assert get_recipe("quality", distill=16) is PRESETS["quality"]  # the same value is no change
    r = get_recipe("paper", structure="mlp", damp="0.001")
    assert r.name == "paper+structure=mlp,damp=0.001" and r.structure == "mlp" and r.damp == 0.001
    with pytest.raises(UsageError, match="unknown recipe field"):
        get_recipe("paper", depth=3)


def test_recipe_files_yaml_json_and_fasp_json(tmp_path):
    (tmp_path / "mine.yaml").write_text("structure: fasp\nselection: wanda\ndistill: 0\n")
    r = get_recipe(str(tmp_path / "mine.yaml"))
    assert r.name == "mine" and (r.structure, r.selection, r.distill) == ("fasp", "wanda", 0)
    assert r.damp == PRESETS[DEFAULT].damp  # unspecified fields are the default recipe's
    (tmp_path / "r.json").write_text(json.dumps(PRESETS["max"].to_dict()))
    assert get_recipe(str(tmp_path / "r.json")) == PRESETS["max"]
    fasp = {"faspx_version": "0.1.0", "source_model": "m", "recipe": get_recipe("fast", distill=2).to_dict()}
    (tmp_path / "fasp.json").write_text(json.dumps(fasp))
    assert get_recipe(str(tmp_path / "fasp.json")) == get_recipe("fast", distill=2)


@pytest.mark.parametrize("text, message", [("structure: [", "could not be read"), ("- 1\n- 2\n", "mapping"),
                                           ("colour: red\n", "unknown recipe field")])
def test_bad_recipe_files(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(UsageError, match=message):
        get_recipe(str(tmp_path / "bad.yaml"))
    with pytest.raises(UsageError, match="neither a preset"):
        get_recipe(str(tmp_path / "missing.yaml"))


def test_a_fasp_json_without_a_recipe_is_refused(tmp_path):
    (tmp_path / "fasp.json").write_text(json.dumps({"faspx_version": "0.0.1", "source_model": "m"}))
    with pytest.raises(UsageError, match="records no recipe"):
        get_recipe(str(tmp_path / "fasp.json"))


def test_the_table_has_a_row_per_preset():
    rows = table()
    assert [r["name"] for r in rows] == list(PRESETS) and all(r["what"] for r in rows)
    assert set(FIELDS) >= {"structure", "selection", "restore", "damp", "guard", "ffn_widths", "distill"}


# Where each figure of faspx.recipes.MEASURED was measured: (file in benchmarks/results, row, sparsity).
MEASURED_ROWS = {
    ("paper", "ppl_0.2"): ("acc-full-128x2048.json", "paper", 0.2),
    ("paper", "ppl_0.3"): ("acc-full-128x2048.json", "paper", 0.3),
    ("wanda", "ppl_0.2"): ("acc-full-128x2048.json", "wanda", 0.2),
    ("quality", "ppl_0.3"): ("acc-full-128x2048-obs.json", "mlp+obs+damp-auto+distill16-step512", 0.3),
    ("quality", "ppl_0.2"): ("build-quality-0.2.json", "quality", 0.2),  # `faspx build` with no method flag
    ("quality", "time_x"): ("recipes-times-128x2048.json", "quality", 0.2),
    ("fast", "ppl_0.2"): ("acc-full-128x2048.json", "mlp", 0.2),  # the old --structure mlp: fast's fields
    ("fast", "time_x"): ("recipes-times-128x2048.json", "fast", 0.2),
    ("quality", "ppl_0.25"): ("acc-2ssp-128x2048.json", "quality", 0.25),
    ("quality", "ppl_0.375"): ("acc-2ssp-128x2048.json", "quality", 0.375),
    ("2ssp", "ppl_0.25"): ("acc-2ssp-128x2048.json", "2ssp", 0.25),
    ("2ssp", "ppl_0.375"): ("acc-2ssp-128x2048.json", "2ssp", 0.375),
    ("2ssp-quality", "ppl_0.25"): ("acc-2ssp-128x2048.json", "2ssp-quality", 0.25),
    ("2ssp-quality", "ppl_0.375"): ("acc-2ssp-128x2048.json", "2ssp-quality", 0.375),
}


def test_every_measured_figure_is_a_row_of_a_results_file():
    from pathlib import Path

    from faspx.recipes import MEASURED

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    figures = {(name, key): value for name, row in MEASURED.items() for key, value in row.items()}
    assert set(figures) == set(MEASURED_ROWS)
    for (name, key), (file, method, sparsity) in MEASURED_ROWS.items():
        data = json.loads((results / file).read_text())
        assert data["settings"]["nsamples"] == 128 and data["settings"]["max_windows"] is None
        (row,) = [r for r in data["rows"] if r["method"] == method and r["sparsity"] == sparsity]
        if key.startswith("ppl"):
            assert figures[name, key] == round(row["ppl"], 2), (name, key)
        else:
            dense_forward = row.get("dense_forward_s", data["dense_forward_s"])  # timed with the row's machine
            assert figures[name, key] == round(row["seconds"] / dense_forward, 2), (name, key)
