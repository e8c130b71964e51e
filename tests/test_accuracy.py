"""benchmarks/accuracy.py: the tables it prints from the sweep's JSON rows."""

from faspx.benchmarks.accuracy import by_sparsity, markdown

RESULTS = {
    "dense_forward_s": 10.0,
    "rows": [
        {"method": "dense", "sparsity": 0.0, "ppl": 20.0, "seconds": 0.0},
        {"method": "paper", "sparsity": 0.2, "ppl": 40.0, "seconds": 25.0},
        {"method": "mlp", "sparsity": 0.2, "ppl": 30.0, "seconds": 20.0},
        {"method": "paper", "sparsity": 0.1, "ppl": 25.0, "seconds": 24.0},
    ],
}


def test_by_sparsity_has_a_column_per_level_and_marks_missing_rows():
    lines = by_sparsity(RESULTS).splitlines()
    assert lines[0] == "| method | s = 0.1 | s = 0.2 |"
    assert lines[2] == "| paper | 25.00 (1.25x) | 40.00 (2.00x) |"
    assert lines[3] == "| mlp | - | 30.00 (1.50x) |"
    assert len(lines) == 4  # no dense line: it is the reference


def test_markdown_has_a_line_per_row_with_ratios_to_dense():
    lines = markdown(RESULTS).splitlines()
    assert len(lines) == 2 + len(RESULTS["rows"])
    assert lines[3] == "| paper | 0.2 | 40.00 | 2.00 | 25 | 2.50 |"
