"""`twincar app MODEL`: the Gradio demo. Upload or paste a car photo (and crop it to the car in
the page's image editor) → the image as the model was fed, the top-5 makes/models with their
probabilities and the Grad-CAM++ overlay of the top class, then "Why not its twin?": the top
class's twin and the Finer-CAM map of the top class against it (what tells them apart here).

Every way in feeds the model as `twincar predict` does: the examples are test images of the run
cut to their car boxes as `predict --data` cuts them (`uploads.example_crops`), and for a model
trained on car-box crops the page asks for a crop of the car.

The twin (`twin_choice`): the top class's partner in the best-ranked pair of the run's twins.csv
(`twincar twins`, or the report's `eval.twins`) that holds it, read from the model folder (the run
copies it there) or else from the run's reports folder; without that file, or when the top class
is in none of its pairs, the runner-up class of the photo, and the output says so.

It loads the safe folder (a pickle only with `--trust-pickle`), binds to 127.0.0.1 unless told
otherwise, never opens a share link, refuses uploads over `max_file_size` (10 MB) or over
`max_pixels` (read from the header, before decoding) and serves several requests at once. Any
file that is no usable image gets the app's own one-line message in the page. Needs
`pip install 'twincar-fast[app]'`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np

from twincar_fast.errors import TwincarError
from twincar_fast.ship.card import card_path, read_config, training_data_root
from twincar_fast.ship.uploads import (
    MAX_FILE_SIZE,
    MAX_PIXELS,
    check_file_size,
    check_max_pixels,
    example_crops,
    open_upload,
)

__all__ = [
    "build_app",
    "classify_fn",
    "example_images",
    "launch_app",
    "load_twins",
    "twin_choice",
    "twin_fn",
]

CONCURRENCY = 4  # requests served at once: a slow photo doesn't hold up the others
# overlays come at the model's input size (224 px, 32 in tests): shown larger, pixels kept sharp
CSS = (
    "#cam img, #twin img, #fed img { min-width: 224px; min-height: 224px; "
    "object-fit: contain; image-rendering: pixelated; }"
)
_CAM_LOCK = threading.Lock()  # Grad-CAM hooks the shared model: one map at a time


def example_images(predictor, model_dir: str | os.PathLike, out_dir, n: int = 4) -> list:
    """(PNG, caption, source image) of up to `n` test images of the run's data cut as `predict --data` cuts
    them, when the data are on this machine."""
    from twincar_fast.data.dataset import read_annotations

    folder = Path(model_dir)
    try:
        config = read_config(card_path(folder if folder.is_dir() else folder.parent))
    except TwincarError:
        return []
    root = training_data_root(config)
    if root is None:
        return []
    return example_crops(predictor, read_annotations(root), out_dir, n)


def _editor_class(gr):
    """Gradio's ImageEditor (crop only) that hands the app the upload undecoded: Gradio's own
    preprocessing decodes every file in full and fails with its internal error on a bad one."""

    class CarEditor(gr.ImageEditor):
        is_template = True  # the browser side of gr.ImageEditor

        def preprocess(self, payload):
            """The edited image (the crop) or else the upload: a file path or bytes, unread."""
            if payload is None:
                return None
            blobs = self.blob_storage.pop(payload.id, None) if payload.id else None
            if blobs is not None:
                return blobs.composite or blobs.background
            picked = payload.composite or payload.background
            return picked.path if picked is not None else None

    return CarEditor


def _checked(source, gr, max_pixels: int):
    """The upload for the predictor, or the page's one-line message when it can't be used."""
    if source is None or (isinstance(source, str) and not source):
        raise gr.Error("Upload or paste a car photo first.", print_exception=False)
    try:
        return open_upload(source, max_pixels)
    except TwincarError as e:
        message = f"This file can't be used: {e}. Try a JPEG or PNG photo."
        raise gr.Error(message, print_exception=False) from None  # the user's, not the log's


def _probs(predictor, image) -> np.ndarray:
    """The class probabilities of one image, fed whole (the page asks for a car crop)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # box-trained: said on the page
        return predictor.predict_proba(image)[0]


def classify_fn(predictor, gr, max_pixels: int = MAX_PIXELS):
    """The app's function: upload → ({class: probability}, the model's input, Grad-CAM++
    overlay, the checked image for the twin step)."""
    from twincar_fast.ship.cam import cam_overlays

    def classify(source) -> tuple:
        image = _checked(source, gr, max_pixels)
        probs = _probs(predictor, image)
        label = {c: float(p) for c, p in zip(predictor.classes, probs, strict=True)}
        top = int(probs.argmax())
        fed = predictor.preprocess.item_array(image)
        with _CAM_LOCK:
            overlay = cam_overlays(predictor, [image], [top])[0]
        cam = _tagged(overlay, f"Grad-CAM++ of {predictor.classes[top]}")
        return label, _tagged(fed, "the model's input"), cam, image

    return classify


def load_twins(model_dir: str | os.PathLike):
    """(the run's twins.csv table, where it was read) for a model folder, or (None, why not)."""
    import pandas as pd

    from twincar_fast.run_folder import TWINS_CSV, resolve_run

    folder = Path(model_dir) if Path(model_dir).is_dir() else Path(model_dir).parent
    candidates = [folder / TWINS_CSV]
    try:
        report = resolve_run(folder).report_dir
    except TwincarError:
        report = None
    if report is not None:
        candidates.append(report / TWINS_CSV)
    for path in candidates:
        if path.is_file():
            return pd.read_csv(path), str(path)
    return None, f"no {TWINS_CSV} with this model (run `twincar twins` on its run)"


def twin_choice(pairs, source: str, classes: list[str], probs: np.ndarray) -> tuple[int, str]:
    """The twin class id of the photo's top class and a sentence saying where it comes from
    (the file's name only: a page never shows a server path)."""
    from twincar_fast.analysis.twins import twin_of

    order = np.argsort(-probs, kind="stable")
    top = classes[int(order[0])]
    found = twin_of(pairs, top) if pairs is not None and len(pairs) else None
    where = f"the run's {Path(source).name}" if pairs is not None else source
    if found is not None and found[0] in classes:
        return classes.index(found[0]), f"the run's twin of {top} (pair #{found[1]} of {where})"
    why = where if pairs is None else f"{top} is in none of the twin pairs of {where}"
    runner_up = int(order[min(1, len(order) - 1)])
    return runner_up, f"the runner-up class of this photo: {why}"


def _tagged(overlay: np.ndarray, what: str):
    """The overlay as a PNG-bound image whose text chunk names the map.

    Gradio caches an output under the hash of its encoded bytes and rewrites that file in place:
    two equal overlays (a flat map gives the plain photo) shared one file, rewritten while the
    browser was still reading the first, so the map's name keeps each output's file its own.
    """
    from PIL import Image

    image = Image.fromarray(overlay)
    image.info["map"] = what
    return image


def twin_fn(predictor, pairs, source: str, gr):
    """The app's second function: the checked image → (which twin and why, Finer-CAM overlay)."""
    from twincar_fast.ship.cam import finer_overlays

    classes = list(predictor.classes)

    def why_not_twin(image) -> tuple[str, object]:
        if image is None:
            raise gr.Error("Classify a car photo first.", print_exception=False)
        probs = _probs(predictor, image)
        top = int(probs.argmax())
        twin, why = twin_choice(pairs, source, classes, probs)
        text = (
            f"**{classes[top]}** (p={probs[top]:.2f}), not **{classes[twin]}** "
            f"(p={probs[twin]:.2f}), {why}. The map: the evidence for {classes[top]} minus "
            f"{classes[twin]}'s (Finer-CAM), what tells them apart in this photo."
        )
        with _CAM_LOCK:
            overlay = finer_overlays(predictor, [image], [top], [twin])[0]
        return text, _tagged(overlay, f"Finer-CAM of {classes[top]} vs {classes[twin]}")

    return why_not_twin


def _intro(n: int, bbox_crop: bool, max_pixels: int) -> str:
    """The page's opening words: what to give the model and what comes back."""
    text = (
        f"## Which car is this?\nUpload or paste a photo (up to {max_pixels / 1e6:g} megapixels): "
        f"the top 5 of {n} makes/models and where the model looked (Grad-CAM++ of the top "
        "class); then why not its twin, the class it is most easily taken for (Finer-CAM)."
    )
    if bbox_crop:
        text += (
            "\n\n**This model was trained on photos cut to the car's box: crop your photo to "
            "the car first** (in the editor: the image tool, then Crop; drag the corners and "
            "Confirm crop), or it is fed the whole photo and does worse. The examples are test images of the run already cut to their car "
            "boxes, as `twincar predict --data` cuts them. *The model's input* shows what it "
            "was fed."
        )
    return text


def _editor(gr):
    """The photo input: upload or paste, then crop to the car (the image tool's crop).

    Gradio hides the whole toolbar, crop included, when both brush and eraser are off, so they
    stay; whatever is drawn is part of the image fed, shown as the model's input.
    """
    return _editor_class(gr)(
        type="filepath",
        sources=["upload", "clipboard"],
        label="car photo (crop it to the car)",
        transforms=("crop",),
        layers=False,
        format="png",
        image_mode="RGB",
        height=360,
        elem_id="photo",
    )


def _examples_label(bbox_crop: bool) -> str:
    """What the examples are: for a box-trained model, already cut as predict --data cuts."""
    if bbox_crop:
        return "test images of the run, cut to their car boxes as twincar predict --data does"
    return "test images of the run"


def _outputs(gr) -> tuple:
    """The result components: top 5, the model's input, Grad-CAM++, the twin's text and map."""
    with gr.Column():
        label = gr.Label(num_top_classes=5, label="top 5", elem_id="prediction")
        with gr.Row():
            fed = gr.Image(type="numpy", label="the model's input", format="png", elem_id="fed")
            cam = gr.Image(type="numpy", label="Grad-CAM++", format="png", elem_id="cam")
    return label, fed, cam


def _inputs(gr, examples: list, bbox_crop: bool) -> tuple:
    """The photo column: the editor, the Classify button and the run's examples under them."""
    with gr.Column():
        editor = _editor(gr)
        button = gr.Button("Classify", variant="primary", elem_id="classify")
        if examples:
            gr.Examples(
                [[p] for p, _, _ in examples],
                editor,
                label=_examples_label(bbox_crop),
                example_labels=[c for _, c, _ in examples],
            )
    return editor, button


def _twin_outputs(gr) -> tuple:
    """The twin row: which twin and why, and the Finer-CAM map of the top class against it."""
    with gr.Row():
        twin_text = gr.Markdown(elem_id="twin-text")
        twin_cam = gr.Image(
            type="numpy", label="Why not its twin? (Finer-CAM)", format="png", elem_id="twin"
        )
    return twin_text, twin_cam


def build_app(
    model: str | os.PathLike,
    trust_pickle: bool = False,
    device: str | None = None,
    max_pixels: int = MAX_PIXELS,
):
    """The Gradio Blocks of the demo for a model folder (or file)."""
    import gradio as gr

    from twincar_fast.ship.predict import Predictor

    max_pixels = check_max_pixels(max_pixels)
    predictor = Predictor.from_path(model, device=device, trust_pickle=trust_pickle)
    scratch = tempfile.mkdtemp(prefix="twincar-app-")
    examples = example_images(predictor, model, scratch)
    pairs, source = load_twins(model)
    bbox_crop = predictor.preprocess.bbox_crop
    with gr.Blocks(title="twincar_fast car recognition") as demo:
        gr.Markdown(_intro(len(predictor.classes), bbox_crop, max_pixels))
        with gr.Row():
            editor, button = _inputs(gr, examples, bbox_crop)
            label, fed, cam = _outputs(gr)
        twin_text, twin_cam = _twin_outputs(gr)
        checked = gr.State()
        classify = classify_fn(predictor, gr, max_pixels)
        outputs = [label, fed, cam, checked]
        done = button.click(classify, editor, outputs, api_name="classify")
        twin = twin_fn(predictor, pairs, source, gr)
        done.success(twin, checked, [twin_text, twin_cam], api_name="twin")
    demo.twincar_examples = examples  # (PNG, caption, source image) of each example
    demo.twincar_scratch = scratch
    weakref.finalize(demo, shutil.rmtree, scratch, ignore_errors=True)
    return demo


def launch_app(
    model: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 7860,
    trust_pickle: bool = False,
    max_file_size: str = MAX_FILE_SIZE,
    prevent_thread_lock: bool = False,
    device: str | None = None,
    max_pixels: int = MAX_PIXELS,
):
    """Serve the demo on host:port (no share link); returns the Blocks once started.

    Args:
        model: the models/<run> folder.
        host: the interface to bind (127.0.0.1: this machine only).
        port: the port (0 or None: Gradio picks a free one from 7860 up).
        trust_pickle: allow learner.pkl, a pickle that can run any code.
        max_file_size: the largest upload Gradio accepts, e.g. "10mb".
        prevent_thread_lock: return at once and serve in the background (tests, notebooks).
        device: where the model runs (default: CUDA, then MPS, then the CPU).
        max_pixels: the most pixels (width × height, read from the header) an upload may have.
    """
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise TwincarError("the app needs Gradio: pip install 'twincar-fast[app]'") from None
    max_file_size = check_file_size(max_file_size)
    demo = build_app(model, trust_pickle=trust_pickle, device=device, max_pixels=max_pixels)
    _serve(demo, host, port, max_file_size)
    if not prevent_thread_lock:
        print(f"serving {model} on {demo.local_url} (Ctrl+C to stop)", flush=True)
        demo.block_thread()
    return demo


def _serve(demo, host: str, port: int | None, max_file_size: str) -> None:
    """Start serving `demo` in the background, or say in one line why the port can't be had."""
    demo.queue(default_concurrency_limit=CONCURRENCY)
    try:
        demo.launch(
            server_name=host,
            server_port=port or None,
            share=False,
            max_file_size=max_file_size,
            prevent_thread_lock=True,
            allowed_paths=[demo.twincar_scratch],
            show_error=True,
            quiet=True,  # Gradio's hints (share=True ...) are not a CLI user's to act on
            css=CSS,
        )
    except OSError as e:
        where = f"{host}:{port}" if port else f"{host} (ports 7860 and up)"
        raise TwincarError(
            f"can't serve on {where}: {' '.join(str(e).split())}; the port is in use or not "
            "allowed: pass another --port (or --port 0 for a free one)"
        ) from None
