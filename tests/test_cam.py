"""Issue 31.10: `twincar predict --cam` overlays are readable, labelled, and said where they went."""

from __future__ import annotations

import numpy as np
from PIL import Image

from twincar_fast.cli import main


def test_cam_overlays_are_enlarged_labelled_and_announced(shipped, tmp_path, capsys):
    learn, folder = shipped
    image = sorted(str(p) for p in learn.dls.valid.items["path"])[0]
    cams = tmp_path / "cams"
    assert main(["predict", str(folder), image, "--cam", str(cams)]) == 0
    err = capsys.readouterr().err
    assert f"→ {cams}" in err  # where they went
    (written,) = sorted(cams.glob("*.png"))
    with Image.open(written) as im:
        pic = np.asarray(im.convert("RGB"))
    assert pic.shape[1] >= 320  # the 32 px model input, enlarged
    caption = pic[pic.shape[1] :]  # the strip under the square overlay
    assert caption.size and (caption < 100).any() and (caption == 255).mean() > 0.5  # text
