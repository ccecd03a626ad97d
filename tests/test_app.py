"""Issue 16.6: the Gradio demo, launched on 127.0.0.1 with a tiny model, called through
gradio_client and driven in a real browser (Playwright with Debian's Chromium)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the app extra: pip install -e '.[app]'")
from gradio_client import Client, handle_file  # noqa: E402

from twincar_fast.cli import main  # noqa: E402
from twincar_fast.ship.app import launch_app  # noqa: E402
from twincar_fast.ship.predict import Predictor  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def app(shipped):
    """The demo serving the shared tiny model in this process's background threads."""
    learn, folder = shipped
    demo = launch_app(folder, port=0, prevent_thread_lock=True, max_file_size="200kb")
    assert demo.local_url.startswith("http://127.0.0.1:")  # this machine only, no share link
    yield demo, learn, folder
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    return Client(app[0].local_url, verbose=False)


def a_test_image(learn) -> str:
    return sorted(str(p) for p in learn.dls.valid.items["path"])[0]


def test_the_client_gets_every_class_and_the_overlay(app, client):
    _, learn, folder = app
    image = a_test_image(learn)
    label, overlay = client.predict(handle_file(image), api_name="/classify")
    probs = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(probs) == set(learn.dls.vocab)  # 4 classes: all within the top 5
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    expected = Predictor.from_path(folder, device="cpu").predict_proba(image)[0]
    got = np.array([probs[c] for c in learn.dls.vocab])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert label["label"] == learn.dls.vocab[int(expected.argmax())]
    with Image.open(overlay) as im:
        assert np.asarray(im.convert("RGB")).shape == (32, 32, 3)


def twin_expected(folder, image, twin):
    """The Finer-CAM overlay of the image's top class against `twin`, computed directly."""
    from twincar_fast.ship.cam import finer_overlays

    predictor = Predictor.from_path(folder, device="cpu")
    probs = predictor.predict_proba(image)[0]
    return probs, finer_overlays(predictor, [image], [int(probs.argmax())], [twin])[0]


def test_why_not_its_twin_falls_back_to_the_runner_up(app, client):
    _, learn, folder = app
    image = a_test_image(learn)
    probs, _ = twin_expected(folder, image, 0)
    runner_up = int(np.argsort(-probs, kind="stable")[1])
    expected = twin_expected(folder, image, runner_up)[1]
    text, overlay = client.predict(handle_file(image), api_name="/twin")
    vocab = list(learn.dls.vocab)
    assert f"not **{vocab[runner_up]}**" in text and "runner-up class of this photo" in text
    assert "no twins.csv with this model" in text
    with Image.open(overlay) as im:
        np.testing.assert_allclose(np.asarray(im.convert("RGB")), expected, atol=2)


def test_why_not_its_twin_takes_the_runs_twin_pair(shipped, tmp_path):
    learn, folder = shipped
    model = tmp_path / "tiny-ship"
    shutil.copytree(folder, model)
    image = a_test_image(learn)
    vocab = list(learn.dls.vocab)
    probs, _ = twin_expected(model, image, 0)
    top, last = int(probs.argmax()), int(probs.argmin())  # the twin: not the runner-up
    rows = [(1, vocab[last], vocab[top]), (2, vocab[top], vocab[(top + 1) % 4])]
    pd.DataFrame(rows, columns=["rank", "class_a", "class_b"]).to_csv(model / "twins.csv")
    demo = launch_app(model, port=0, prevent_thread_lock=True)
    try:
        text, overlay = Client(demo.local_url, verbose=False).predict(
            handle_file(image), api_name="/twin"
        )
    finally:
        demo.close()
    assert f"**{vocab[top]}**" in text and f"not **{vocab[last]}**" in text
    assert "pair #1 of" in text and "twins.csv" in text
    with Image.open(overlay) as im:
        got = np.asarray(im.convert("RGB"))
    np.testing.assert_allclose(got, twin_expected(model, image, last)[1], atol=2)


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(app, client, tmp_path):
    _, learn, _ = app
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a picture")
    cut = tmp_path / "cut.jpg"
    whole = Path(a_test_image(learn)).read_bytes()
    cut.write_bytes(whole[: len(whole) * 2 // 3])  # the header whole, the pixels cut short
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8)).save(big)
    assert big.stat().st_size > 200_000  # over the app's max_file_size here
    for path, needle in [(notes, "image"), (cut, "can't be used"), (big, "")]:
        with pytest.raises(Exception) as e:  # noqa: B017 - gradio_client's AppError / upload error
            client.predict(handle_file(str(path)), api_name="/classify")
        assert needle in str(e.value)
    label, _ = client.predict(handle_file(a_test_image(learn)), api_name="/classify")
    assert label["label"] in learn.dls.vocab


def test_the_app_refuses_a_pickle_without_trust(tmp_path, capsys):
    (tmp_path / "learner.pkl").write_bytes(b"not loaded")
    assert main(["app", str(tmp_path)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium: apt-get install chromium")
def test_a_real_browser_uploads_a_photo_and_sees_the_result(app, tmp_path):
    from playwright.sync_api import sync_playwright

    demo, learn, folder = app
    image = a_test_image(learn)
    expected = Predictor.from_path(folder, device="cpu").predict(image, top_k=1)[0]["label"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(demo.local_url)
            page.locator("input[type=file]").first.set_input_files(image)
            page.locator("#classify").click()
            page.locator("#prediction").get_by_text(expected).first.wait_for(timeout=60_000)
            overlay = page.locator("#cam img").first
            overlay.wait_for(timeout=60_000)
            overlay.evaluate("img => img.decode()")  # wait for its pixels (rejects if broken)
            assert overlay.evaluate("img => img.complete && img.naturalWidth") == 32
            twin = page.locator("#twin img").first
            twin.wait_for(timeout=60_000)  # "Why not its twin?"
            twin.evaluate("img => img.decode()")  # loaded whole: its own file, never rewritten
            assert twin.get_attribute("src") != overlay.get_attribute("src")
            assert overlay.evaluate("img => img.complete && img.naturalWidth") == 32
            assert "runner-up" in page.locator("#twin-text").inner_text()
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            browser.close()
    with Image.open(tmp_path / "app.png") as shot:
        assert shot.size[0] >= 1100
    keep = os.environ.get("TWINCAR_APP_SCREENSHOT")  # e.g. docs/app.png, the README's picture
    if keep:
        shutil.copy(tmp_path / "app.png", keep)
