"""The benchmark harness in its tiny mode: both sides run on the same images and the JSON is whole."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.measure import compare, tree_memory_kb
from benchmarks.run import GOALS, RESULT_KEYS, main


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """One `python -m benchmarks.run --tiny` run, with its data cache and JSON under tmp."""
    tmp = tmp_path_factory.mktemp("bench")
    path = main(["--tiny", "--data-root", str(tmp / "data"), "--out", str(tmp / "out")])
    assert path.parent == tmp / "out" and path.suffix == ".json"
    return json.loads(path.read_text())


def test_json_has_every_comparison(tiny_results):
    for key in ("machine", "settings", "data", "goals", *RESULT_KEYS):
        assert key in tiny_results, key
    for key in RESULT_KEYS:
        entry = tiny_results[key]
        assert entry["ours"] > 0 and entry["reference"] > 0
        assert {"unit", "ratio"} <= set(entry)
    assert tiny_results["machine"]["cpu_count"] == os.cpu_count()
    assert set(tiny_results["goals"]) == set(GOALS)


def test_both_sides_saw_the_same_images(tiny_results):
    pipe = tiny_results["data_pipeline"]
    assert pipe["n_images"]["ours"] == pipe["n_images"]["reference"] > 0
    epoch = tiny_results["train_epoch"]["n_images"]
    assert epoch["ours"] == epoch["reference"]
    assert epoch["ours"]["train"] > 0 and epoch["ours"]["valid"] > 0
    for key in ("predict_single", "predict_batch"):
        n = tiny_results[key]["n_images"]
        assert n["ours"] == n["reference"] > 0


def test_ratios_point_the_right_way(tiny_results):
    # rates: ours / reference; times and memory: reference / ours (> 1 always means ours is better)
    pipe, epoch = tiny_results["data_pipeline"], tiny_results["train_epoch"]
    assert pipe["ratio"] == pytest.approx(pipe["ours"] / pipe["reference"], rel=0.01)
    assert epoch["ratio"] == pytest.approx(epoch["reference"] / epoch["ours"], rel=0.01)
    single = tiny_results["predict_single"]
    assert single["ratio_vs_fastai"] == pytest.approx(single["fastai"] / single["ours"], rel=0.01)
    assert single["forward_ms"] > 0  # the model alone: the ceiling of the vs-learn.predict ratio
    assert single["ratio_vs_fastai_ceiling"] == pytest.approx(
        single["fastai"] / single["forward_ms"], rel=0.01
    )
    # the limit of single-image prediction and the ONNX backend (issue 16.7)
    assert 0 < single["limit_ms"] and single["onnx"] > 0
    assert single["ratio_to_limit"] == pytest.approx(single["limit_ms"] / single["ours"], rel=0.01)
    batch = tiny_results["predict_batch"]
    assert batch["n_images"]["onnx"] == batch["n_images"]["ours"]
    assert batch["onnx_vs_torch"] == pytest.approx(batch["onnx"] / batch["ours"], rel=0.01)
    assert tiny_results["goals"]["predict_batch_onnx_vs_torch"]["ratio"] == batch["onnx_vs_torch"]
    ceiling = batch["onnx_forward_ceiling"]  # what bounds onnx_vs_torch, measured beside it
    assert ceiling["ratio"] == pytest.approx(ceiling["torch_ms"] / ceiling["onnx_ms"], rel=0.01)
    assert ceiling["images"] == batch["batch_size"]
    assert batch["n_images"]["onnx_int8"] == batch["n_images"]["ours"] and batch["onnx_int8"] > 0
    assert batch["onnx_int8_vs_torch"] == pytest.approx(
        batch["onnx_int8"] / batch["ours"], rel=0.01
    )
    assert "/" in batch["onnx_int8_check"]["top1_equal"]
    assert "predict_single_vs_fastai" not in tiny_results["goals"]  # information only now
    assert compare(2.0, 1.0, "img/s", higher_is_better=True)["ratio"] == 2.0
    assert compare(2.0, 1.0, "s", higher_is_better=False)["ratio"] == 0.5


def test_tree_memory_counts_children():
    import subprocess
    import sys

    alone = tree_memory_kb(os.getpid())
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; x = bytearray(50_000_000); time.sleep(5)"]
    )
    try:
        import time

        for _ in range(50):  # wait until the child holds its 50 MB
            if tree_memory_kb(child.pid) > 40_000:
                break
            time.sleep(0.1)
        assert tree_memory_kb(os.getpid()) > alone + 40_000
    finally:
        child.kill()
        child.wait()


def test_the_epoch_is_measured_against_its_limit_and_the_cache_build_apart(tiny_results):
    epoch = tiny_results["train_epoch"]
    assert epoch["n_images"]["limit"] == epoch["n_images"]["ours"]  # the same work, no loader
    assert epoch["limit"] > 0
    # the ratio comes from our epochs and the limit's taken in turns in one process
    turns = epoch["limit_turns"]
    assert len(turns["ours_seconds"]) == len(turns["limit_seconds"]) == 1  # tiny: one turn
    assert turns["limit"] == epoch["limit"] == turns["limit_seconds"][0]
    assert epoch["ratio_to_limit"] == pytest.approx(turns["limit"] / turns["ours"], rel=0.01)
    assert 0 < turns["train_only"]["limit"] <= turns["limit"]
    assert tiny_results["goals"]["train_epoch_to_limit"]["ratio"] == epoch["ratio_to_limit"]
    build = tiny_results["cache_build"]
    assert build["seconds"] > 0 and build["mb"] >= 0 and build["images"] > 0
    assert "ours_per_item" in tiny_results["data_pipeline"]["variants"]


def test_the_validation_pass_benchmark_times_both_loaders_over_the_same_images(tmp_path):
    from benchmarks.valid_pass import main as valid_pass

    args = ["--tiny", "--passes", "2", "--data-root", str(tmp_path / "data")]
    result = valid_pass([*args, "--out", str(tmp_path / "out")])
    assert len(list((tmp_path / "out").glob("valid-pass-*.json"))) == 1
    rates = result["img_per_s_by_pass"]
    assert set(rates) == {"read", "kept"} and all(
        len(r) == 2 and min(r) > 0 for r in rates.values()
    )
    later = result["later_passes"]
    assert later["ratio"] == round(later["ours"] / later["reference"], 3)
    assert result["images"] > 0 and result["img_size"] == 32
