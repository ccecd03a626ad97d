"""`twincar app MODEL`: the Gradio demo. Upload or paste a car photo → the top-5 makes/models with
their probabilities and the Grad-CAM++ overlay of the top class, then "Why not its twin?": the top
class's twin and the Finer-CAM map of the top class against it (what tells them apart here).

The twin (`twin_choice`): the top class's partner in the best-ranked pair of the run's twins.csv
(`twincar twins`, or the report's `eval.twins`) that holds it, read from the model folder (the run
copies it there) or else from the run's reports folder; without that file, or when the top class
is in none of its pairs, the runner-up class of the photo, and the output says so.

It loads the safe folder (a pickle only with `--trust-pickle`), binds to 127.0.0.1 unless told
otherwise, never opens a share link, and refuses uploads over `max_file_size` (10 MB). A file
that is no image gets a message in the page and the server keeps serving. Example images come
from the run's test split when its data are on this machine. Needs `pip install 'twincar-fast[app]'`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from twincar_fast.data.images import image_problem
from twincar_fast.errors import TwincarError
from twincar_fast.ship.card import card_path, read_config, training_data_root

__all__ = [
    "build_app",
    "classify_fn",
    "example_images",
    "launch_app",
    "load_twins",
    "twin_choice",
    "twin_fn",
]

MAX_FILE_SIZE = "10mb"
# overlays come at the model's input size (224 px, 32 in tests): shown larger, pixels kept sharp
CSS = "#cam img, #twin img { min-width: 224px; min-height: 224px; object-fit: contain; image-rendering: pixelated; }"


def example_images(model_dir: str | os.PathLike, n: int = 4) -> list[str]:
    """Up to `n` test images of the run's data (one per class first), when they are here."""
    from twincar_fast.data.dataset import read_annotations

    folder = Path(model_dir)
    try:
        config = read_config(card_path(folder if folder.is_dir() else folder.parent))
    except TwincarError:
        return []
    root = training_data_root(config)
    if root is None:
        return []
    df = read_annotations(root)
    test = df[df["split"] == "test"]
    picks = test.drop_duplicates("class_id").head(n)
    return [p for p in picks["path"].tolist() if Path(p).is_file()]


def classify_fn(predictor, gr):
    """The app's function: image path → ({class: probability}, Grad-CAM++ overlay)."""
    from twincar_fast.ship.cam import cam_overlays

    def classify(path: str | None) -> tuple[dict[str, float], object]:
        probs = _probs(predictor, _checked(path, gr))
        label = {c: float(p) for c, p in zip(predictor.classes, probs, strict=True)}
        top = int(probs.argmax())
        overlay = cam_overlays(predictor, [path], [top])[0]
        return label, _tagged(overlay, f"Grad-CAM++ of {predictor.classes[top]}")

    return classify


def load_twins(model_dir: str | os.PathLike):
    """(the run's twins.csv table, where it was read) for a model folder, or (None, why not)."""
    import pandas as pd

    from twincar_fast.analysis.evaluate import resolve_run
    from twincar_fast.analysis.twins import TWINS_CSV

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
    """The twin class id of the photo's top class and a sentence saying where it comes from."""
    from twincar_fast.analysis.twins import twin_of

    order = np.argsort(-probs, kind="stable")
    top = classes[int(order[0])]
    found = twin_of(pairs, top) if pairs is not None and len(pairs) else None
    if found is not None and found[0] in classes:
        return classes.index(found[0]), f"the run's twin of {top} (pair #{found[1]} of {source})"
    why = source if pairs is None else f"{top} is in none of the twin pairs of {source}"
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


def _checked(path: str | None, gr) -> Path:
    """The uploaded file, or a message in the page when there is none or it is no image."""
    if not path:
        raise gr.Error("Upload or paste a car photo first.")
    problem = image_problem(Path(path))
    if problem is not None:
        raise gr.Error(f"This file can't be used: {problem}. Try a JPEG or PNG photo.")
    return Path(path)


def _probs(predictor, path: Path) -> np.ndarray:
    """The class probabilities of one photo."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # box-trained models: no box here
        return predictor.predict_proba(str(path))[0]


def twin_fn(predictor, pairs, source: str, gr):
    """The app's second function: image path → (which twin and why, Finer-CAM overlay)."""
    from twincar_fast.ship.cam import finer_overlays

    classes = list(predictor.classes)

    def why_not_twin(path: str | None) -> tuple[str, object]:
        probs = _probs(predictor, _checked(path, gr))
        top = int(probs.argmax())
        twin, why = twin_choice(pairs, source, classes, probs)
        text = (
            f"**{classes[top]}** (p={probs[top]:.2f}), not **{classes[twin]}** "
            f"(p={probs[twin]:.2f}), {why}. The map: the evidence for {classes[top]} minus "
            f"{classes[twin]}'s (Finer-CAM), what tells them apart in this photo."
        )
        overlay = finer_overlays(predictor, [path], [top], [twin])[0]
        return text, _tagged(overlay, f"Finer-CAM of {classes[top]} vs {classes[twin]}")

    return why_not_twin


def build_app(model: str | os.PathLike, trust_pickle: bool = False, device: str | None = None):
    """The Gradio Blocks of the demo for a model folder (or file)."""
    import gradio as gr

    from twincar_fast.ship.predict import Predictor

    predictor = Predictor.from_path(model, device=device, trust_pickle=trust_pickle)
    examples = example_images(model)
    pairs, source = load_twins(model)
    n = len(predictor.classes)
    with gr.Blocks(title="twincar_fast car recognition") as demo:
        gr.Markdown(
            f"## Which car is this?\nUpload or paste a photo: the top 5 of {n} makes/models "
            "and where the model looked (Grad-CAM++ of the top class); then why not its twin, "
            "the class it is most easily taken for (Finer-CAM: top class minus twin)."
        )
        with gr.Row():
            image = gr.Image(
                type="filepath",
                sources=["upload", "clipboard"],
                label="car photo",
                format="png",
                height=320,
            )
            with gr.Column():
                label = gr.Label(num_top_classes=5, label="top 5", elem_id="prediction")
                cam = gr.Image(
                    type="numpy", label="Grad-CAM++", format="png", elem_id="cam", height=240
                )
        with gr.Row():
            twin_text = gr.Markdown(elem_id="twin-text")
            twin_cam = gr.Image(
                type="numpy",
                label="Why not its twin? (Finer-CAM)",
                format="png",
                elem_id="twin",
                height=240,
            )
        button = gr.Button("Classify", variant="primary", elem_id="classify")
        done = button.click(classify_fn(predictor, gr), image, [label, cam], api_name="classify")
        twin = twin_fn(predictor, pairs, source, gr)
        done.success(twin, image, [twin_text, twin_cam], api_name="twin")
        if examples:
            gr.Examples(examples, image, label="test images of the run")
    demo.twincar_examples = examples  # launch_app lets Gradio serve these files
    return demo


def launch_app(
    model: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 7860,
    trust_pickle: bool = False,
    max_file_size: str = MAX_FILE_SIZE,
    prevent_thread_lock: bool = False,
    device: str | None = None,
):
    """Serve the demo on host:port (no share link); returns the Blocks once started.

    Args:
        model: the models/<run> folder.
        host: the interface to bind (127.0.0.1: this machine only).
        port: the port (0 or None: Gradio picks a free one from 7860 up).
        trust_pickle: allow learner.pkl, a pickle that can run any code.
        max_file_size: the largest upload Gradio accepts, e.g. "10mb".
        prevent_thread_lock: return at once and serve in the background (tests, notebooks).
        device: where the model runs (default: CUDA when available).
    """
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise TwincarError("the app needs Gradio: pip install 'twincar-fast[app]'") from None
    demo = build_app(model, trust_pickle=trust_pickle, device=device)
    demo.launch(
        server_name=host,
        server_port=port or None,
        share=False,
        max_file_size=max_file_size,
        prevent_thread_lock=prevent_thread_lock,
        allowed_paths=demo.twincar_examples,
        show_error=True,
        quiet=prevent_thread_lock,
        css=CSS,
    )
    return demo
