"""The predictor: same probabilities as fastai's validation pipeline, from every model format."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import sensitive_export
from PIL import Image

from twincar_fast.cli import main
from twincar_fast.data import build_dls, read_annotations
from twincar_fast.errors import TwincarError
from twincar_fast.model.learner import create_learner
from twincar_fast.ship.batch import predict_files
from twincar_fast.ship.export import export_model
from twincar_fast.ship.predict import Predictor, Preprocess

TOL = 1e-4  # on probabilities


@pytest.fixture(scope="module")
def trained(shipped):
    """A tiny learner with input-sensitive outputs (conftest `shipped`), its dls and folder."""
    learn, model_dir = shipped
    return learn, learn.dls, model_dir


@pytest.fixture(scope="module")
def big_jpegs(tiny_data, tmp_path_factory):
    """Test images re-saved 10× larger, so the draft decoder reduces them (item_size is 40)."""
    out = tmp_path_factory.mktemp("big")
    paths = []
    for i, src in enumerate(sorted((tiny_data / "images").glob("test_*_000.jpg"))):
        with Image.open(src) as im:
            im.resize((480 + 7 * i, 320 + 3 * i), Image.BICUBIC).save(out / src.name, quality=90)
        paths.append(out / src.name)
    return paths


def valid_paths(dls) -> list[str]:
    return [str(p) for p in dls.valid.items["path"]]


def fastai_probs(learn, dl) -> np.ndarray:
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=dl)
    return probs.numpy()


@pytest.mark.parametrize("fmt", ["folder", "model.safetensors", "learner.pkl"])
def test_probs_match_fastai_validation(trained, fmt):
    learn, dls, model_dir = trained
    expected = fastai_probs(learn, dls.valid)
    assert expected.max(1).mean() > 0.5 and len(set(expected.argmax(1))) > 1
    path = model_dir if fmt == "folder" else model_dir / fmt
    predictor = Predictor.from_path(path, device="cpu", trust_pickle=fmt == "learner.pkl")
    got = predictor.predict_proba(valid_paths(dls))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOL)
    assert predictor.classes == list(dls.vocab)
    # the check can fail: the same model with a squished instead of cropped item is far off
    predictor.preprocess = dataclasses.replace(predictor.preprocess, resize="squish")
    assert np.abs(predictor.predict_proba(valid_paths(dls)) - expected).max() > 0.05


def test_draft_decoded_large_jpegs_match_fastai(trained, big_jpegs):
    learn, dls, model_dir = trained
    with Image.open(big_jpegs[0]) as im:
        im.draft("RGB", (40, 40))
        assert im.size[0] < 480  # the decoder really reduces these files
    expected = fastai_probs(learn, dls.test_dl(big_jpegs))
    predictor = Predictor.from_path(model_dir / "model.safetensors", device="cpu")
    np.testing.assert_allclose(predictor.predict_proba(big_jpegs), expected, atol=TOL)
    # decoding these in full instead gives other pixels, and the check sees it
    predictor.preprocess = dataclasses.replace(predictor.preprocess, draft=False)
    assert np.abs(predictor.predict_proba(big_jpegs) - expected).max() > 10 * TOL


@pytest.mark.parametrize("head", ["mlp", "fastai", "timm"])
def test_every_head_loads_from_the_safe_files(tiny_cfg, tmp_path, head):
    """The merge of issues 12 and 13 typed model.json without the timm head: its export failed."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.head, cfg.train.mixed_precision = head, "none"
    dls = build_dls(cfg)
    learn = create_learner(cfg, dls)
    export_model(learn, tmp_path / "m", cfg)
    predictor = Predictor.from_path(tmp_path / "m" / "model.safetensors", device="cpu")
    expected = fastai_probs(learn, dls.valid)
    np.testing.assert_allclose(predictor.predict_proba(valid_paths(dls)), expected, atol=TOL)


@pytest.mark.parametrize("stage, presize", [("item", 32), ("batch", 80)])
@pytest.mark.parametrize("resize", ["crop", "squish", "pad"])
def test_inputs_match_fastai_valid_batches(tiny_cfg, resize, stage, presize):
    tiny_cfg.data = dataclasses.replace(tiny_cfg.data, resize=resize, item_size=80)
    tiny_cfg.aug.stage = stage  # item: resized straight to 32; batch: to 80, then on the device
    dls = build_dls(tiny_cfg)  # 80 → 32: also fastai's area pre-shrink before bilinear
    xb, _ = dls.valid.one_batch()
    pre = Preprocess.from_dls(dls)
    assert (pre.item_size, pre.img_size, pre.resize) == (presize, 32, resize)
    paths = valid_paths(dls)[: len(xb)]
    x = pre.batch([pre.item(p) for p in paths], torch.device("cpu"))
    torch.testing.assert_close(x, xb.as_subclass(torch.Tensor), atol=TOL, rtol=0)


def test_export_card_and_predictor_read_the_loaders_validation_resize(tiny_cfg, tmp_path):
    """Issue 30.2: one reader of the validation pipeline and one pad-mode fallback, the loaders'."""
    from fastai.vision.augment import Resize

    from twincar_fast.data.geometry import PAD_MODE, InputGeometry
    from twincar_fast.ship.card import ModelCard, read_model_card
    from twincar_fast.ship.inputs import ItemPrep

    tiny_cfg.data = dataclasses.replace(tiny_cfg.data, resize="pad", item_size=80)
    tiny_cfg.aug.stage = "batch"  # validation items padded to 80, then resampled on the device
    dls = build_dls(tiny_cfg)
    resize = next(t for t in dls.valid.after_item.fs if isinstance(t, Resize))
    loaders = (int(resize.size[0]), str(resize.method), str(resize.pad_mode))
    assert loaders == (80, "pad", PAD_MODE)
    learn = create_learner(tiny_cfg, dls)
    export_model(learn, tmp_path / "m", tiny_cfg)
    card = read_model_card(tmp_path / "m")
    predictor = Predictor.from_path(tmp_path / "m", device="cpu")
    readers = [card, Preprocess.from_dls(dls), predictor.preprocess, InputGeometry.from_dls(dls)]
    for reader in readers:
        assert (reader.item_size, reader.resize, reader.pad_mode) == loaders, type(reader)
    norm = dls.valid.after_batch.fs[-1]
    for reader in readers[:3]:
        np.testing.assert_allclose(reader.mean, norm.mean.flatten().tolist(), rtol=1e-6)
        np.testing.assert_allclose(reader.std, norm.std.flatten().tolist(), rtol=1e-6)
    fallbacks = (ModelCard.__dataclass_fields__["pad_mode"].default, ItemPrep.pad_mode)
    assert fallbacks == (PAD_MODE, PAD_MODE) and InputGeometry(8, 8).pad_mode == PAD_MODE


def test_a_damaged_learner_pkl_is_the_same_one_line_as_for_evaluate(tmp_path):
    from twincar_fast.analysis.learner_pkl import load_learner_pkl

    junk = tmp_path / "learner.pkl"
    junk.write_text("not a pickle")
    line = r"learner.pkl: can't load the learner \(.+\); export it again with `twincar run`$"
    with pytest.raises(TwincarError, match=line):
        Predictor.from_path(junk, device="cpu", trust_pickle=True)
    with pytest.raises(TwincarError, match=line):
        load_learner_pkl(junk)


def test_predict_results(trained):
    learn, dls, model_dir = trained
    predictor = Predictor.from_path(model_dir, device="cpu")
    paths = valid_paths(dls)[:3]
    probs = predictor.predict_proba(paths)
    results = predictor.predict(paths, top_k=3)
    assert len(results) == 3
    for r, p in zip(results, probs, strict=True):
        assert r["class_id"] == int(p.argmax())
        assert r["label"] == dls.vocab[r["class_id"]]
        assert r["prob"] == pytest.approx(float(p.max()))
        assert [t["prob"] for t in r["topk"]] == sorted(
            (t["prob"] for t in r["topk"]), reverse=True
        )
        assert len(r["topk"]) == 3 and r["topk"][0]["label"] == r["label"]
    assert len(predictor.predict(paths[0], top_k=99)[0]["topk"]) == len(dls.vocab)
    assert predictor.predict_proba([]).shape == (0, len(dls.vocab))


def test_pil_images_and_paths_agree(trained):
    _, dls, model_dir = trained
    predictor = Predictor.from_path(model_dir, device="cpu")
    path = valid_paths(dls)[0]
    with Image.open(path) as im:
        from_image = predictor.predict_proba(im.convert("RGB"))
    np.testing.assert_allclose(from_image, predictor.predict_proba(path), atol=1e-6)


def test_predict_files_prints_a_table(trained, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # long labels stay on one line of the table
    _, dls, model_dir = trained
    paths = valid_paths(dls)[:2]
    results = predict_files(model_dir, paths, top_k=2)
    out = capsys.readouterr().out
    assert [r["image"] for r in results] == paths
    assert all(r["label"] in out for r in results)
    assert main(["predict", str(model_dir), paths[0], "--top-k", "1"]) == 0


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    _, dls, model_dir = trained
    image = valid_paths(dls)[0]
    with pytest.raises(TwincarError) as e:
        predict_files(tmp_path / "nope.safetensors", [image])
    assert "nope.safetensors" in one_line(e)
    with pytest.raises(TwincarError) as e:
        Predictor.from_path(tmp_path)  # a folder without a model
    assert "no model.safetensors or learner.pkl" in one_line(e)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(model_dir / "model.safetensors", lone)
    with pytest.raises(TwincarError) as e:
        Predictor.from_path(lone / "model.safetensors")
    assert "model.json" in one_line(e)
    with pytest.raises(TwincarError) as e:
        predict_files(model_dir, [tmp_path / "missing.jpg"])
    assert "missing.jpg" in one_line(e)
    fake = tmp_path / "notes.jpg"
    fake.write_text("not a picture")
    with pytest.raises(TwincarError) as e:
        predict_files(model_dir, [fake])
    assert "notes.jpg" in one_line(e)
    with pytest.raises(TwincarError):
        predict_files(model_dir, [image], top_k=0)
    assert main(["predict", str(model_dir), str(fake)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.jpg" in err


def test_mismatched_weights_are_one_line(trained, tmp_path):
    _, _, model_dir = trained
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    meta = json.loads((bad / "config.json").read_text())
    meta["label_names"] = meta["label_names"][:2]  # 2 outputs can't take the 4-class weights
    meta["num_classes"] = 2
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(TwincarError) as e:
        Predictor.from_path(bad / "model.safetensors")
    assert "config.json" in one_line(e)


# ---------------------------------------------------------------- car boxes


@pytest.fixture(scope="module")
def box_trained(tiny_data, tmp_path_factory):
    """A tiny learner trained on car-box crops (bbox_crop), made input-sensitive, exported."""
    from conftest import make_tiny_cfg

    out = tmp_path_factory.mktemp("predict_boxes")
    cfg = make_tiny_cfg(tiny_data, out)
    cfg.train.mixed_precision = "none"
    cfg.data = dataclasses.replace(cfg.data, bbox_crop=True, bbox_margin=0.16, resize="squish")
    learn, model_dir = sensitive_export(cfg, out / "models" / "box-run")
    return learn, cfg, model_dir


@pytest.mark.parametrize("fmt", ["model.safetensors", "learner.pkl"])
def test_predictor_with_boxes_matches_evaluate(box_trained, tiny_data, tmp_path, fmt):
    from twincar_fast.analysis.evaluate import evaluate_learner

    learn, cfg, model_dir = box_trained
    with learn.no_bar():
        result = evaluate_learner(learn, tiny_data, "test", tmp_path, cfg)
    table = pd.read_csv(tmp_path / "predictions_test.csv")
    rows = read_annotations(tiny_data).set_index("image").loc[table["image"]]
    boxes = rows[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]].to_numpy()
    predictor = Predictor.from_path(
        model_dir / fmt, device="cpu", trust_pickle=fmt == "learner.pkl"
    )
    assert predictor.preprocess.bbox_crop and predictor.preprocess.bbox_margin == 0.16
    probs = predictor.predict_proba(rows["path"].tolist(), boxes=boxes)
    np.testing.assert_allclose(probs.max(1), table["probability"], atol=TOL)
    acc = float((probs.argmax(1) == table["true_id"]).mean())
    assert acc == pytest.approx(result["test_acc"])
    # whole images instead: other inputs, other probabilities, and a warning says why
    with pytest.warns(UserWarning, match="car-box crops"):
        whole = predictor.predict(rows["path"].tolist())
    assert all(r["box"] is None for r in whole)
    assert np.abs(np.array([r["prob"] for r in whole]) - table["probability"]).max() > 0.05


def test_predict_files_boxes_from_data_and_csv(box_trained, tiny_data, tmp_path, capsys):
    learn, cfg, model_dir = box_trained
    df = read_annotations(tiny_data)
    test = df[df["split"] == "test"].head(4)
    paths = test["path"].tolist()
    expected = Predictor.from_path(model_dir, device="cpu").predict_proba(
        paths, boxes=test[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]].to_numpy()
    )
    out = tmp_path / "preds.csv"
    rows = predict_files(model_dir, paths, top_k=2, data=tiny_data, out=out)
    assert "warning" not in capsys.readouterr().err
    np.testing.assert_allclose([r["prob"] for r in rows], expected.max(1), atol=TOL)
    written = pd.read_csv(out)
    assert list(written.columns[:5]) == ["image", "label", "prob", "top1", "top1_prob"]
    assert written["box"].str.split().map(len).eq(4).all()
    # the same boxes from a CSV, one image left without a box
    csv = tmp_path / "boxes.csv"
    cols = {"bbox_x1": "x1", "bbox_y1": "y1", "bbox_x2": "x2", "bbox_y2": "y2"}
    boxes = test.iloc[:3].rename(columns=cols)[["image", "x1", "y1", "x2", "y2"]]
    boxes.assign(image=paths[:3]).to_csv(csv, index=False)
    js = tmp_path / "preds.json"
    rows = predict_files(model_dir, paths, top_k=2, boxes=csv, out=js)
    printed = capsys.readouterr().err
    assert printed.count("warning") == 1 and "1 of 4" in printed
    np.testing.assert_allclose([r["prob"] for r in rows[:3]], expected.max(1)[:3], atol=TOL)
    assert rows[3]["box"] is None and json.loads(js.read_text())[3]["box"] is None
    assert main(["predict", str(model_dir), *paths, "--boxes", str(csv), "--out", str(out)]) == 0
    assert pd.read_csv(out)["box"].tolist()[3] == "none"


def test_unreadable_image_is_listed_and_the_rest_predicted(trained, tmp_path, capsys):
    _, dls, model_dir = trained
    good = valid_paths(dls)[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    rows = predict_files(model_dir, [good[0], bad, good[1]], top_k=1)
    assert [r.get("label") is not None for r in rows] == [True, False, True]
    assert "broken.jpg" in rows[1]["image"] and rows[1]["error"]
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "error" in out  # plain lines: stdout is not a terminal here


def test_plain_output_keeps_whole_paths_and_tabs(trained, capsys):
    _, dls, model_dir = trained
    paths = valid_paths(dls)[:2]
    predict_files(model_dir, paths, top_k=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths


def test_shorten_left_keeps_the_file_name():
    from twincar_fast.ship.batch import shorten_left

    path = "data/demo/raw/cars_test/00017.jpg"
    assert shorten_left(path, 20) == "…" + path[-19:] and len(shorten_left(path, 20)) == 20
    assert shorten_left(path, 99) == path


def test_batches_decoded_ahead_keep_order_and_equal_one_call(trained):
    _, dls, model_dir = trained
    predictor = Predictor.from_path(model_dir, device="cpu")
    paths = valid_paths(dls)
    whole = predictor.predict_proba(paths)
    for bs, threads in ((1, 4), (3, 2), (len(paths) + 5, 2), (3, 1)):
        predictor.batch_size, predictor.num_threads = bs, threads
        # other batch sizes: other convolution kernels, so float rounding differs a little
        np.testing.assert_allclose(predictor.predict_proba(paths), whole, atol=TOL)
        batches = list(predictor.predict_batches(paths, top_k=2))
        assert [len(b) for b in batches] == [
            min(bs, len(paths) - i) for i in range(0, len(paths), bs)
        ]
        rows = [r for b in batches for r in b]
        assert [r["class_id"] for r in rows] == whole.argmax(1).tolist()


def test_items_ahead_runs_one_batch_ahead_and_stops_with_its_caller():
    import threading
    import time

    from twincar_fast.ship.inputs import items_ahead

    started: list[int] = []
    lock = threading.Lock()

    def item(i, _box):
        with lock:
            started.append(i)
        time.sleep(0.01)
        if i == 7:
            raise ValueError("unreadable 7")
        return i * 10

    def wait_started(n: int) -> list[int]:
        for _ in range(200):
            if len(started) >= n:
                break
            time.sleep(0.01)
        time.sleep(0.05)  # and nothing more starts
        return sorted(started)

    gen = items_ahead(item, list(range(9)), [None] * 9, batch_size=3, num_threads=3)
    assert next(gen) == [0, 10, 20]
    assert wait_started(6) == list(range(6))  # the second batch, and only it, made meanwhile
    assert next(gen) == [30, 40, 50]
    with pytest.raises(ValueError, match="unreadable 7"):  # raised with the batch holding it
        next(gen)
    gen = items_ahead(item, list(range(9)), [None] * 9, batch_size=3, num_threads=3)
    started.clear()
    assert next(gen) == [0, 10, 20]
    gen.close()  # the caller stops early: nothing beyond the batch ahead is started
    time.sleep(0.05)
    assert max(started) <= 5
