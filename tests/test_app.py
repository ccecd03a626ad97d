"""Issues 16.6, 29.12-13/17, 31.1/9/10: the Gradio demo, launched on 127.0.0.1 with a tiny
box-trained model, called through gradio_client and driven in a real browser (Playwright with
Debian's Chromium)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_cfg, sensitive_export
from PIL import Image

gr = pytest.importorskip("gradio", reason="the app extra: pip install -e '.[app]'")
from gradio_client import Client, handle_file  # noqa: E402

from twincar_fast.cli import main  # noqa: E402
from twincar_fast.ship.app import CONCURRENCY, launch_app  # noqa: E402
from twincar_fast.ship.batch import predict_files  # noqa: E402
from twincar_fast.ship.predict import Predictor  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def boxed(tiny_data, tmp_path_factory):
    """(learner, model folder) of a tiny input-sensitive model trained on car-box crops."""
    out = tmp_path_factory.mktemp("boxed")
    cfg = make_tiny_cfg(tiny_data, out)
    cfg.data = dataclasses.replace(cfg.data, bbox_crop=True)
    cfg.train.mixed_precision = "none"
    return sensitive_export(cfg, out / "models" / "tiny-box")


@pytest.fixture(scope="module")
def app(boxed):
    """The demo serving the box-trained tiny model in this process's background threads."""
    learn, folder = boxed
    demo = launch_app(folder, port=0, prevent_thread_lock=True, max_file_size="200kb")
    assert demo.local_url.startswith("http://127.0.0.1:")  # this machine only, no share link
    yield demo, learn, folder
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    return Client(app[0].local_url, verbose=False)


def photo(path) -> dict:
    """The image editor's value for an uploaded file, as the browser sends it."""
    return {"background": handle_file(str(path)), "layers": [], "composite": None}


def a_test_image(learn) -> str:
    return sorted(str(p) for p in learn.dls.valid.items["path"])[0]


def test_every_example_gets_predicts_top1_with_data(app, client, tiny_data, capsys):
    demo, learn, folder = app
    examples = demo.twincar_examples
    assert len(examples) == 4 and all("(car box)" in c for _, c, _ in examples)
    sources = [s for _, _, s in examples]
    rows = predict_files(folder, sources, top_k=4, data=tiny_data)  # twincar predict --data
    capsys.readouterr()
    for (png, _, _), row in zip(examples, rows, strict=True):
        label, fed, _, *_ = client.predict(photo(png), api_name="/classify")
        assert label["label"] == row["label"]
        got = {c["label"]: c["confidence"] for c in label["confidences"]}
        for t in row["topk"]:
            assert got[t["label"]] == pytest.approx(t["prob"], abs=1e-5)
        item = Predictor.from_path(folder, device="cpu").preprocess.item_array(png)
        with Image.open(fed) as im:  # the page shows what the model was fed: the item
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), item)
    whole = Predictor.from_path(folder, device="cpu")
    with pytest.warns(UserWarning, match="car-box crops"):
        whole_top = [r["label"] for r in whole.predict(sources)]
    # the examples fed whole (the app before) get other answers: the boxes matter here
    assert whole_top != [r["label"] for r in rows]


def whole(folder, image) -> np.ndarray:
    """The probabilities of an image fed whole (the box-trained model's warning expected)."""
    with pytest.warns(UserWarning, match="car-box crops"):
        return Predictor.from_path(folder, device="cpu").predict_proba(image)[0]


def test_the_client_gets_every_class_and_the_overlay(app, client):
    _, learn, folder = app
    image = a_test_image(learn)
    label, fed, overlay = client.predict(photo(image), api_name="/classify")
    probs = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(probs) == set(learn.dls.vocab)  # 4 classes: all within the top 5
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    expected = whole(folder, image)  # an upload is fed as it is (cropped in the page, or not)
    got = np.array([probs[c] for c in learn.dls.vocab])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert label["label"] == learn.dls.vocab[int(expected.argmax())]
    with Image.open(overlay) as im:
        assert np.asarray(im.convert("RGB")).shape == (32, 32, 3)
    item = Predictor.from_path(folder, device="cpu").preprocess.item_array(image)
    with Image.open(fed) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), item)


def twin_expected(folder, image, twin):
    """The Finer-CAM overlay of the image's top class against `twin`, computed directly."""
    from twincar_fast.ship.cam import finer_overlays

    predictor = Predictor.from_path(folder, device="cpu")
    probs = whole(folder, image)
    return probs, finer_overlays(predictor, [image], [int(probs.argmax())], [twin])[0]


def test_why_not_its_twin_falls_back_to_the_runner_up(app, client):
    _, learn, folder = app
    image = a_test_image(learn)
    probs, _ = twin_expected(folder, image, 0)
    runner_up = int(np.argsort(-probs, kind="stable")[1])
    expected = twin_expected(folder, image, runner_up)[1]
    client.predict(photo(image), api_name="/classify")
    text, overlay = client.predict(api_name="/twin")  # the photo just classified
    vocab = list(learn.dls.vocab)
    assert f"not **{vocab[runner_up]}**" in text and "runner-up class of this photo" in text
    assert "no twins.csv with this model" in text
    with Image.open(overlay) as im:
        np.testing.assert_allclose(np.asarray(im.convert("RGB")), expected, atol=2)


def test_why_not_its_twin_takes_the_runs_twin_pair(boxed, tmp_path):
    learn, folder = boxed
    model = tmp_path / "tiny-box"
    shutil.copytree(folder, model)
    image = a_test_image(learn)
    vocab = list(learn.dls.vocab)
    probs, _ = twin_expected(model, image, 0)
    top, last = int(probs.argmax()), int(probs.argmin())  # the twin: not the runner-up
    rows = [(1, vocab[last], vocab[top]), (2, vocab[top], vocab[(top + 1) % 4])]
    pd.DataFrame(rows, columns=["rank", "class_a", "class_b"]).to_csv(model / "twins.csv")
    demo = launch_app(model, port=0, prevent_thread_lock=True)
    try:
        client = Client(demo.local_url, verbose=False)
        client.predict(photo(image), api_name="/classify")
        text, overlay = client.predict(api_name="/twin")
    finally:
        demo.close()
    assert f"**{vocab[top]}**" in text and f"not **{vocab[last]}**" in text
    assert "pair #1 of the run's twins.csv" in text
    assert str(tmp_path) not in text and "models/" not in text  # no server path in the page
    with Image.open(overlay) as im:
        got = np.asarray(im.convert("RGB"))
    np.testing.assert_allclose(got, twin_expected(model, image, last)[1], atol=2)


def bad_uploads(folder: Path, good: str) -> dict[str, Path]:
    """Files that are no usable image, each as a careless user might upload it."""
    folder.mkdir(exist_ok=True)
    whole_bytes = Path(good).read_bytes()
    files = {
        "text.jpg": b"not a picture",
        "empty.jpg": b"",
        "cut.jpg": whole_bytes[: len(whole_bytes) * 2 // 3],  # header whole, pixels cut short
        "page.html": b"<!doctype html><html><body>hello</body></html>",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    # 13000 x 13000 px in a few KB: decoded as RGB it would take 500 MB
    Image.new("1", (13000, 13000), 1).save(folder / "huge.png")
    return {name: folder / name for name in [*files, "huge.png"]}


def test_bad_uploads_get_the_apps_own_line_and_the_server_keeps_serving(
    app, client, tmp_path, capfd
):
    _, learn, _ = app
    files = bad_uploads(tmp_path / "bad", a_test_image(learn))
    assert files["huge.png"].stat().st_size < 200_000  # under max_file_size: the pixels count
    capfd.readouterr()
    for name, path in files.items():
        start = time.perf_counter()
        with pytest.raises(Exception) as e:  # noqa: B017 - gradio_client's AppError
            client.predict(photo(path), api_name="/classify")
        message = str(e.value)
        assert "This file can't be used:" in message, name
        assert "/tmp" not in message and "gradio" not in message.lower(), name
        assert time.perf_counter() - start < 10, name  # refused from the header, not decoded
    assert "megapixels, over this app's limit of 40" in message  # huge.png, the last
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8)).save(big)
    assert big.stat().st_size > 200_000  # over the app's max_file_size here
    with pytest.raises(Exception):  # noqa: B017 - refused by Gradio's upload route
        client.predict(photo(big), api_name="/classify")
    label, _, _ = client.predict(photo(a_test_image(learn)), api_name="/classify")
    assert label["label"] in learn.dls.vocab
    assert "Traceback" not in capfd.readouterr().err  # the server's log: no traceback either


def test_requests_are_served_side_by_side(app):
    demo = app[0]
    # Gradio's default is one request at a time per event: a slow photo held up everyone
    assert demo._queue.default_concurrency_limit == CONCURRENCY > 1


def test_the_app_refuses_a_pickle_without_trust(tmp_path, capsys):
    (tmp_path / "learner.pkl").write_bytes(b"not loaded")
    assert main(["app", str(tmp_path)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_options_and_a_taken_port_are_one_line_errors(boxed, capsys):
    _, folder = boxed
    for argv, needle in [
        (["--max-file-size", "abc"], "--max-file-size 'abc'"),
        (["--max-pixels", "0"], "--max-pixels 0"),
    ]:
        assert main(["app", str(folder), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    server = subprocess.Popen(
        [sys.executable, "-m", "twincar_fast.cli", "app", str(folder), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        line = server.stdout.readline()  # the CLI's own line, once serving
        assert f"http://127.0.0.1:{port}" in line, line
        assert main(["app", str(folder), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--port" in err and str(port) in err
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert "share=True" not in line + out  # Gradio's hint is not a CLI user's to act on


def _classify_in_page(page, timeout=60_000) -> str:
    """Click Classify and return the top label the page shows."""
    page.locator("#classify").click()
    top = page.locator("#prediction [data-testid=label-output-value]")
    top.wait_for(timeout=timeout)
    return top.inner_text()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium: apt-get install chromium")
def test_a_real_browser_runs_each_example_as_predict_does(app, tiny_data, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    demo, _, folder = app
    rows = predict_files(folder, [s for _, _, s in demo.twincar_examples], data=tiny_data)
    capsys.readouterr()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            for (_, caption, _), row in zip(demo.twincar_examples, rows, strict=True):
                page.goto(demo.local_url)  # empty outputs: the label read is this example's
                page.get_by_text(caption).first.click()
                assert _classify_in_page(page) == row["label"], caption
            page.screenshot(path=str(tmp_path / "example.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium: apt-get install chromium")
def test_a_real_browser_uploads_and_sees_what_was_fed(app, tmp_path):
    from playwright.sync_api import sync_playwright

    demo, learn, folder = app
    image = a_test_image(learn)
    expected = Predictor.from_path(folder, device="cpu").classes[int(whole(folder, image).argmax())]
    bad = bad_uploads(tmp_path / "bad", image)["text.jpg"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(demo.local_url)
            page.get_by_text("crop your photo to the car first").wait_for()  # box-trained
            with page.expect_file_chooser() as chooser:
                page.get_by_label("Upload", exact=True).click()
            chooser.value.set_files(image)
            assert _classify_in_page(page) == expected  # the whole upload, as the API has it
            fed = page.locator("#fed img").first
            fed.evaluate("img => img.decode()")
            assert fed.evaluate("img => img.naturalWidth") == 32  # the model's input, shown
            overlay = page.locator("#cam img").first
            overlay.evaluate("img => img.decode()")  # wait for its pixels (rejects if broken)
            assert overlay.evaluate("img => img.complete && img.naturalWidth") == 32
            twin = page.locator("#twin img").first
            twin.wait_for(timeout=60_000)  # "Why not its twin?"
            twin.evaluate("img => img.decode()")  # loaded whole: its own file, never rewritten
            assert "runner-up" in page.locator("#twin-text").inner_text()
            page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)
            page.goto(demo.local_url)
            with page.expect_file_chooser() as chooser:
                page.get_by_label("Upload", exact=True).click()
            chooser.value.set_files(str(bad))
            page.locator("#classify").click()
            # the browser's editor can't draw a non-image, so it may send nothing: either way
            # the app's own line, not Gradio's internal error
            own = re.compile("This file can't be used|Upload or paste a car photo first")
            page.get_by_text(own).first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "bad.png"), full_page=True)
        finally:
            browser.close()
    keep = os.environ.get("TWINCAR_APP_SCREENSHOT")  # e.g. docs/app.png, the README's picture
    if keep:
        shutil.copy(tmp_path / "upload.png", keep)
