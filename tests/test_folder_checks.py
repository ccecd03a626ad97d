"""Issue 29 items 1, 14, 18 and issue 31 item 3: a model folder is checked when it loads.

Each weights file's sha256 is recorded in config.json where it is written and compared on load; an
ONNX graph must take the items and give the classes config.json describes; damaged ONNX files
and absurd config.json files end in one line; the public ONNX path never imports torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from twincar_fast.cli import main
from twincar_fast.errors import TwincarError
from twincar_fast.ship.predict import Predictor


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def copy_folder(folder, tmp_path, hashes: bool = True):
    """A copy of a model folder; without `hashes`, as written before sha256 records existed."""
    copy = shutil.copytree(folder, tmp_path / "m")
    if not hashes:
        config = json.loads((copy / "config.json").read_text())
        config["twincar"].pop("sha256", None)
        (copy / "config.json").write_text(json.dumps(config))
    return copy


def foreign_graph(path, side: int, n_out: int) -> None:
    """Another model's ONNX graph: uint8 N×3×side×side items → `n_out` logits."""
    w = np.linspace(-1, 1, 3 * n_out, dtype=np.float32).reshape(3, n_out)
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "other",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])],
        [
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("w", TensorProto.FLOAT, [3, n_out], w.flatten()),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def images(learn, n: int = 3) -> list[str]:
    return sorted(str(p) for p in learn.dls.valid.items["path"])[:n]


# ---------------------------------------------------------------- item 1: hashes and graph sizes


def test_each_weights_file_has_its_sha256_in_config_json(shipped_onnx):
    from twincar_fast.ship.integrity import file_sha256

    _, folder = shipped_onnx
    hashes = json.loads((folder / "config.json").read_text())["twincar"]["sha256"]
    assert set(hashes) == {"model.safetensors", "model.onnx"}
    for name, digest in hashes.items():
        assert digest == file_sha256(folder / name)


def test_flipped_bytes_in_the_weights_are_refused(shipped, tmp_path, capsys):
    learn, folder = shipped
    copy = copy_folder(folder, tmp_path)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a tensor: safetensors itself loads this silently
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TwincarError) as e:
        Predictor.from_path(copy, device="cpu")
    assert "model.safetensors" in one_line(e) and "re-export" in one_line(e)
    assert main(["predict", str(copy), *images(learn)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sha256" in err


@pytest.mark.parametrize("hashes", [True, False])
def test_an_onnx_graph_of_another_model_is_refused(shipped_onnx, tmp_path, capsys, hashes):
    learn, folder = shipped_onnx
    copy = copy_folder(folder, tmp_path, hashes)
    side = json.loads((copy / "config.json").read_text())["twincar"]["item_size"]
    foreign_graph(copy / "model.onnx", side, 3)  # 3 outputs in a 4-class folder
    assert main(["predict", str(copy), *images(learn), "--backend", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("sha256" in err) if hashes else ("3 outputs, but config.json lists 4 classes" in err)
    foreign_graph(copy / "model.onnx", side * 2, 4)  # the right classes, another input size
    with pytest.raises(TwincarError) as e:
        Predictor.from_path(copy, backend="onnx")
    assert ("sha256" if hashes else f"gives items of {side} px") in one_line(e)


# ---------------------------------------------------------------- item 14: damaged ONNX files


def _external(path) -> None:
    """An ONNX model whose weights point outside its folder (external data at ../secret.bin)."""
    foreign_graph(path, 8, 4)
    model = onnx.load(str(path))
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../secret.bin")
    w.external_data.add(key="length", value="48")
    (path.parent.parent / "secret.bin").write_bytes(bytes(48))
    onnx.save(model, str(path))


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped", "random", "external"])
@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx"])
def test_damaged_onnx_files_are_one_line(shipped_onnx, tmp_path, capsys, damage, name):
    learn, folder = shipped_onnx
    copy = copy_folder(folder, tmp_path, hashes=False)  # not caught by the hash: by onnxruntime
    path = copy / name
    good = (folder / "model.onnx").read_bytes()
    if damage == "external":
        _external(path)
    else:
        rng = np.random.default_rng(0)
        data = {
            "empty": b"",
            "truncated": good[: len(good) // 3],
            "flipped": bytes(b ^ 0xFF if i < 64 else b for i, b in enumerate(good)),
            "random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        }[damage]
        path.write_bytes(data)
    backend = "onnx-int8" if "int8" in name else "onnx"
    assert main(["predict", str(copy), *images(learn, 1), "--backend", backend]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "twincar export" in err, err


# ---------------------------------------------------------------- item 18: absurd config.json


def test_a_deeply_nested_config_json_is_one_line(shipped, tmp_path):
    _, folder = shipped
    copy = copy_folder(folder, tmp_path)
    (copy / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    for backend in ("torch", "onnx"):
        with pytest.raises(TwincarError) as e:
            Predictor.from_path(copy, device="cpu" if backend == "torch" else None, backend=backend)
        assert "config.json" in one_line(e) and "nested too deeply" in one_line(e)


# ---------------------------------------------------------------- issue 31.3: no torch for ONNX

NO_TORCH = """
import sys


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "fastai", "timm", "torchvision"):
            raise ModuleNotFoundError(f"{name} is blocked in this test")


sys.meta_path.insert(0, Refuse())
from twincar_fast import Predictor

p = Predictor.from_path(sys.argv[1], backend="onnx")
print(p.predict(sys.argv[2:], top_k=1)[0]["label"])
heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "fastai", "timm")]
assert not heavy, heavy
"""


def test_the_public_onnx_path_works_with_torch_and_fastai_unimportable(shipped_onnx, tmp_path):
    learn, folder = shipped_onnx
    image = images(learn, 1)
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(folder), *image],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = Predictor.from_path(folder, backend="onnx").predict(image, top_k=1)[0]["label"]
    assert proc.stdout.strip().splitlines()[-1] == expected
