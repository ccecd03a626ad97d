"""Issue 16.5: a torchvision ResNet state dict (TwinCar's checkpoint, both head shapes) becomes a
model folder whose logits equal torchvision's own model; wrong files are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from conftest import CLASS_NAMES
from PIL import Image
from torchvision import transforms

from twincar_fast.cli import main
from twincar_fast.errors import TwincarError
from twincar_fast.ship.checkpoint import import_torchvision
from twincar_fast.ship.predict import Predictor

N = len(CLASS_NAMES)


def twincar_net(head: str) -> torch.nn.Module:
    """torchvision's randomly initialised resnet50 (no download) with TwinCar's head shape."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    if head == "linear":  # TwinCar README's snippet
        net.fc = torch.nn.Linear(2048, N)
    else:  # TwinCar's 2-layer MLP head
        net.fc = torch.nn.Sequential(
            torch.nn.Linear(2048, 64),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(64, N),
        )
    return net.eval()


@pytest.fixture(scope="module")
def classes_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("classes") / "classes.csv"
    pd.DataFrame({"class_id": range(N), "label": CLASS_NAMES}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 300×200 photo-like JPEG (smooth gradients plus noise)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:200, 0:300]
    arr = np.stack([xx * 0.8, yy * 1.2, (xx + yy) * 0.5], -1) + rng.normal(0, 20, (200, 300, 3))
    path = tmp_path_factory.mktemp("photo") / "car.jpg"
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=95)
    return path


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_imported_checkpoint_gives_torchvisions_logits(head, classes_csv, photo, tmp_path):
    net = twincar_net(head)
    ckpt = tmp_path / "twin_car_best_model_v2.pth"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "twincar-v2"
    argv = ["import-torchvision", str(ckpt), "--classes", str(classes_csv), "--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["twincar"]["head"] == ("timm" if head == "linear" else "mlp")
    assert config["pretrained_cfg"]["crop_pct"] == pytest.approx(0.875)
    assert config["label_names"] == CLASS_NAMES
    predictor = Predictor.from_path(out, device="cpu")
    # the same preprocessed input: TwinCar's own transform
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    with Image.open(photo) as im:
        x = tf(im.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        expected = net(x)
        got = predictor.model(x)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # ... and our preprocessing of the file is TwinCar's, pixel for pixel
    pre = predictor.preprocess
    ours = pre.batch([pre.item(photo)], torch.device("cpu"))
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        predictor.predict_proba(photo), expected.softmax(1).numpy(), atol=1e-4
    )
    assert main(argv) == 2  # the folder holds a model now: never replaced


def test_evaluate_puts_the_imported_model_on_the_test_split(classes_csv, tiny_data, tmp_path):
    """TwinCar's model and ours side by side: `twincar evaluate` on the imported folder."""
    net = twincar_net("mlp")
    torch.save(net.state_dict(), tmp_path / "ckpt.pth")
    out = tmp_path / "twincar-v2"
    import_torchvision(tmp_path / "ckpt.pth", tiny_data / "classes.csv", out)
    argv = ["evaluate", str(out), "--data", str(tiny_data), "--split", "test"]
    assert main([*argv, "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval_test.json").read_text())
    table = pd.read_csv(tmp_path / "eval" / "predictions_test.csv")
    assert result["n_images"] == len(table) == 24
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    images = [tiny_data / p for p in table["image"]]
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        expected = net(x).softmax(1).numpy()
    np.testing.assert_allclose(table["probability"], expected.max(1), atol=1e-4)
    acc = float((expected.argmax(1) == table["true_id"]).mean())
    assert result["test_acc"] == pytest.approx(acc)
    assert main([*argv[:-1], "valid"]) == 2  # no run config: the valid split can't be rebuilt


def test_wrong_checkpoints_are_one_line_errors(classes_csv, tmp_path):
    net = twincar_net("linear")
    sd = net.state_dict()
    cases = {
        "no_fc": ({k: v for k, v in sd.items() if not k.startswith("fc.")}, "no 'fc.*' tensors"),
        "classes": ({**sd, "fc.weight": torch.zeros(7, 2048), "fc.bias": torch.zeros(7)},
                    "7 outputs but"),
        "shape": ({**sd, "conv1.weight": torch.zeros(64, 3, 3, 3)}, "tensor 'conv1.weight'"),
        "missing": ({k: v for k, v in sd.items() if not k.startswith("layer4.")},
                    "tensors missing"),
        "odd_head": ({**{k: v for k, v in sd.items() if not k.startswith("fc.")},
                      "fc.0.weight": torch.zeros(8, 2048), "fc.0.bias": torch.zeros(8),
                      "fc.1.weight": torch.zeros(8), "fc.1.bias": torch.zeros(8),
                      "fc.4.weight": torch.zeros(N, 8), "fc.4.bias": torch.zeros(N)},
                     "TwinCar's MLP"),
    }  # fmt: skip
    for name, (state, needle) in cases.items():
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(TwincarError) as e:
            import_torchvision(tmp_path / f"{name}.pth", classes_csv, tmp_path / name)
        assert needle in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
        assert not (tmp_path / name / "config.json").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TwincarError, match="not a readable"):
        import_torchvision(tmp_path / "junk.pth", classes_csv, tmp_path / "junk")


@pytest.mark.parametrize(
    ("key", "value"), [("fc.weight", float("nan")), ("conv1.weight", float("inf"))]
)
def test_non_finite_weights_are_refused(classes_csv, tmp_path, capsys, key, value):
    """Issue 29.3: NaN/inf weights made a folder that predicts nan."""
    sd = twincar_net("linear").state_dict()
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = value
    torch.save(sd, tmp_path / "bad.pth")
    argv = ["import-torchvision", str(tmp_path / "bad.pth"), "--classes", str(classes_csv)]
    assert main([*argv, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"tensor '{key}' holds 1 NaN/inf value" in err, err
    assert not (tmp_path / "m").exists()


def test_imported_folder_records_the_weights_sha256(classes_csv, tmp_path):
    """Issue 29.1: the hash is written where the file is, and checked on load."""
    from twincar_fast.ship.integrity import file_sha256

    torch.save(twincar_net("linear").state_dict(), tmp_path / "ok.pth")
    out = import_torchvision(tmp_path / "ok.pth", classes_csv, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["twincar"]["sha256"] == {
        "model.safetensors": file_sha256(out / "model.safetensors")
    }
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-100] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TwincarError, match="sha256"):
        Predictor.from_path(out, device="cpu")
