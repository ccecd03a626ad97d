"""What a person reads on the page and figures: the Twins table fits, lr_find.png has a title."""

from __future__ import annotations

import json
import re

import pandas as pd

from twincar_fast.analysis.report import write_index


def test_twins_table_has_short_wrapping_headers_inside_a_scroll_box(tmp_path):
    pairs = pd.DataFrame(
        {
            "rank": [1], "class_a": ["Dynamo Alpha Wagon 2009"], "class_b": ["Dynamo Alpha Wagon 2012"],
            "score": [0.13], "confusion_a_as_b": [0.25], "confusion_b_as_a": [0.02],
            "centroid_cosine": [0.91], "n_a_as_b": [10], "n_b_as_a": [1], "drop_finer": [0.17],
            "drop_gradcam": [0.12], "part_ratio_finer": [2.5], "part_ratio_gradcam": [2.2],
            "designed_twin": [True],
        }
    )  # fmt: skip
    pairs.to_csv(tmp_path / "twins.csv", index=False)
    summary = {"split": "test", "n_pairs": 1, "confusion_splits": ["test"], "all_pairs": {}}
    (tmp_path / "twins.json").write_text(json.dumps(summary))
    page = write_index(tmp_path).read_text()
    section = page.split("<h2>Twins")[1].split("<h2>")[0]
    assert '<div class="wide"><table>' in section  # scrolls inside its column, never spills
    headers = re.findall(r"<th>([^<]*)</th>", section)
    assert len(headers) == 14 and "A seen as B" in headers
    words = [w for h in headers for w in h.split()]
    assert max(len(w) for w in words) <= 12, headers  # they wrap: no 16-character header


def test_lr_find_figure_has_a_title(tiny_cfg, tmp_path):
    from twincar_fast.data import build_dls
    from twincar_fast.experiment import lr_find_figure, lr_find_report
    from twincar_fast.model.learner import create_learner

    learn = create_learner(tiny_cfg, build_dls(tiny_cfg))
    result = lr_find_report(learn, tmp_path, num_it=30)
    fig = lr_find_figure(learn, result)
    assert fig.axes[0].get_title().startswith("Learning-rate finder: loss over")
