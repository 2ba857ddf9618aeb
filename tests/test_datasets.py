"""Tests for vpstudy.datasets: formats, lazy images and error messages."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from vpstudy.datasets import DatasetError, load_dataset


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (6, 4), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def jsonl_data(tmp_path: Path) -> Path:
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "img" / "a.png").write_bytes(png_bytes((255, 0, 0)))
    (tmp_path / "data" / "img" / "gray.png").write_bytes(png_bytes((9, 9, 9), mode="L"))
    (tmp_path / "data" / "img" / "junk.png").write_bytes(b"not an image")
    return write_jsonl(
        tmp_path / "data" / "x.jsonl",
        [
            {"id": 1, "image": "img/a.png", "question": "Color?", "answer": "red",
             "choices": ["red", "blue"], "category": "color"},
            "",
            {"id": "b", "image": "img/gray.png", "question": "Shade?"},
            {"id": 3, "image": "img/missing.png", "question": "Q?", "answer": 7},
            {"id": 4, "image": "img/junk.png", "question": "Q?"},
        ],
    )


def test_jsonl_relative_images(jsonl_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    dataset = load_dataset("data/x.jsonl")
    assert (dataset.name, len(dataset)) == ("x", 4)
    first = dataset[0]
    assert (first.id, first.question, first.answer) == ("1", "Color?", "red")
    assert first.choices == ["red", "blue"]
    assert first.extra == {"category": "color"}
    assert first.source == "data/x.jsonl:line 1"
    assert dataset[1].source == "data/x.jsonl:line 3"  # blank lines are skipped, not renumbered
    assert (dataset[1].answer, dataset[1].choices, dataset[1].extra) == (None, None, {})
    assert dataset[2].answer == "7"

    monkeypatch.chdir("/")  # relative image paths resolve against the data file, not the cwd
    image = first.image()
    assert (image.mode, image.size) == ("RGB", (6, 4))
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert dataset[1].image().mode == "RGB"
    assert [e.id for e in dataset[1:3]] == ["b", "3"]
    assert [e.id for e in load_dataset(jsonl_data, limit=2)] == ["1", "b"]


def test_images_are_opened_lazily(jsonl_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    dataset = load_dataset("data/x.jsonl")  # loads fine despite a missing and a broken image
    with pytest.raises(DatasetError) as err:
        dataset[2].image()
    assert str(err.value) == "data/x.jsonl:line 4: image 'img/missing.png' not found"
    with pytest.raises(DatasetError, match=r"^data/x.jsonl:line 5: image 'img/junk.png' cannot be read as an image"):
        dataset[3].image()


def test_parquet_with_image_bytes(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "id": [10, 11, 12],
            "image": [png_bytes((0, 255, 0)), png_bytes((0, 0, 255)), b"garbage"],
            "question": ["q0", "q1", "q2"],
            "answer": ["A", None, "C"],
            "choices": [["A", "B"], None, ["C"]],
            "split": ["val", "val", "test"],
        }
    )
    frame.to_parquet(tmp_path / "toy.parquet")
    dataset = load_dataset(tmp_path / "toy.parquet")
    assert [e.id for e in dataset] == ["10", "11", "12"]
    assert [e.answer for e in dataset] == ["A", None, "C"]
    assert [e.choices for e in dataset] == [["A", "B"], None, ["C"]]
    assert dataset[2].extra == {"split": "test"}
    assert dataset[1].source == f"{tmp_path}/toy.parquet:row 1"
    assert dataset[1].image().getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(DatasetError, match=r"toy.parquet:row 2: image \(7 bytes\) cannot be read as an image"):
        dataset[2].image()
    assert len(load_dataset(tmp_path / "toy.parquet", limit=1)) == 1


def test_save_to_disk_directory(tmp_path: Path) -> None:
    import datasets

    images = [Image.new("RGB", (5, 5), (i * 100, 0, 0)) for i in range(3)]
    features = datasets.Features(
        {"id": datasets.Value("int64"), "image": datasets.Image(), "question": datasets.Value("string"),
         "answer": datasets.Value("string"), "source_name": datasets.Value("string")}
    )
    hf = datasets.Dataset.from_dict(
        {"id": [0, 1, 2], "image": images, "question": ["q"] * 3, "answer": ["a", "b", "c"],
         "source_name": ["s"] * 3},
        features=features,
    )
    hf.save_to_disk(str(tmp_path / "hf_toy"))
    dataset = load_dataset(tmp_path / "hf_toy", limit=2)
    assert dataset.name == "hf_toy"
    assert [(e.id, e.answer) for e in dataset] == [("0", "a"), ("1", "b")]
    assert dataset[0].extra == {"source_name": "s"}
    assert dataset[1].source == f"{tmp_path}/hf_toy:row 1"
    assert dataset[1].image().getpixel((0, 0)) == (100, 0, 0)

    datasets.DatasetDict({"train": hf, "test": hf}).save_to_disk(str(tmp_path / "hf_dict"))
    with pytest.raises(DatasetError, match="holds splits train, test; pass one split directory"):
        load_dataset(tmp_path / "hf_dict")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"^{tmp_path}/nope.jsonl: no such file or directory$"):
        load_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("id,image\n")
    with pytest.raises(DatasetError, match=r"d.csv: unsupported extension '.csv'"):
        load_dataset(tmp_path / "d.csv")
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": 1, "image": "a.png", "question": "q"}, "{oops"])
    with pytest.raises(DatasetError, match=f"^{path}:line 2: malformed JSON"):
        load_dataset(path)
    assert len(load_dataset(path, limit=1)) == 1  # records past the limit are not parsed


@pytest.mark.parametrize("field", ["id", "image", "question"])
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    record = {"id": 1, "image": "a.png", "question": "q"}
    del record[field]
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 0, "image": "a.png", "question": "q"}, record])
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert str(err.value) == f"{path}:line 2: required field '{field}' is missing"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": 1, "image": "a.png", "question": "q", "choices": "A or B"},
         "line 2: field 'choices' must be a list, got str"),
        ({"id": "0", "image": "a.png", "question": "q"}, "line 2: duplicate id '0' (first at {path}:line 1)"),
        ({"id": [1], "image": "a.png", "question": "q"}, "line 2: field 'id' must be a scalar, got list"),
        ({"id": 1, "image": 5, "question": "q"}, "line 2: field 'image' must be a path or image bytes"),
        ({"id": 1, "image": "a.png", "question": 5}, "line 2: field 'question' must be a string"),
        ([1, 2], "line 2: expected an object, got list"),
    ],
)
def test_record_errors(tmp_path: Path, record: object, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 0, "image": "a.png", "question": "q"}, json.dumps(record)])
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert str(err.value).startswith(f"{path}:" + message.format(path=path))


def test_jsonl_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": 0, "image": "a.png", "question": "q"}\n'
                     b'{"id": 1, "image": "a.png", "question": "caf\xe9"}\n')
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert str(err.value) == f"{path}:line 2: not UTF-8 text (byte 0xe9 at column 45); save the file as UTF-8"
    assert len(load_dataset(path, limit=1)) == 1
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"id": 0, "image": "a.png", "question": "q"}\n')
    assert load_dataset(bom)[0].id == "0"  # a UTF-8 byte-order mark is fine


def _image_dataset(tmp_path: Path, image: Image.Image, name: str, fmt: str = "PNG") -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    image.save(tmp_path / "img" / name, format=fmt)
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"id": 0, "image": f"img/{name}", "question": "q"}])


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    import numpy as np

    levels = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    path = _image_dataset(tmp_path, Image.fromarray(levels), "deep.png")
    with Image.open(tmp_path / "img" / "deep.png") as raw:
        assert raw.mode.startswith("I")  # a real 16-bit PNG
    rgb = np.asarray(load_dataset(path)[0].image())
    assert rgb.shape == (1, 4, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0, :, 0].tolist() == [0, 100, 255, 4]  # PIL's own convert gives [0, 255, 255, 255]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[0.0, 0.5, 1.0]], [0, 128, 255]),  # float in 0..1: scaled
        ([[0.0, 100.0, 255.0]], [0, 100, 255]),  # float in 0..255: kept
        ([[0.0, 70.0, 300.5]], "with values in \\[0, 300.5\\], which fit neither 8-bit nor 16-bit nor 0..1 grey"),
        ([[0.0, float("nan"), 1.0]], "with NaN or infinite values"),
    ],
)
def test_float_images_are_scaled_or_refused(tmp_path: Path, values: list, expected: object) -> None:
    import numpy as np

    path = _image_dataset(tmp_path, Image.fromarray(np.asarray(values, dtype=np.float32), mode="F"), "f.tiff", "TIFF")
    example = load_dataset(path)[0]
    if isinstance(expected, str):
        with pytest.raises(DatasetError, match=f"^{path}:line 1: image 'img/f.tiff' has mode F {expected}.*; save it"):
            example.image()
    else:
        assert np.asarray(example.image())[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[0, 100, 255]], [0, 100, 255]),  # 32-bit integers in 0..255: kept
        ([[0, 257 * 50, 65535]], [0, 50, 255]),  # in 0..65535: 16-bit levels
        ([[0, 1, 70000]], "values in \\[0, 70000\\], which fit neither 8-bit nor 16-bit grey levels"),
        ([[-5, 0, 10]], "values in \\[-5, 10\\]"),
    ],
)
def test_32_bit_integer_images_are_scaled_or_refused(tmp_path: Path, values: list, expected: object) -> None:
    import numpy as np

    image = Image.fromarray(np.asarray(values, dtype=np.int32), mode="I")
    path = _image_dataset(tmp_path, image, "i.tiff", "TIFF")
    example = load_dataset(path)[0]
    if isinstance(expected, str):
        with pytest.raises(DatasetError, match=f"image 'img/i.tiff' has mode I with {expected}"):
            example.image()
    else:
        assert np.asarray(example.image())[0, :, 0].tolist() == expected


def test_fingerprint_covers_the_whole_source_not_the_limit(jsonl_data: Path, tmp_path: Path) -> None:
    whole = load_dataset(jsonl_data).fingerprint()
    assert whole["records"] == 4 and len(whole["sha256"]) == 64
    assert load_dataset(jsonl_data, limit=1).fingerprint() == whole  # a --limit prefix is the same dataset
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(jsonl_data.parent, copy)
    assert load_dataset(copy / "x.jsonl").fingerprint() == whole  # the same files elsewhere: the same dataset
    (copy / "img" / "a.png").write_bytes(png_bytes((255, 0, 0), size=(64, 48)))  # an image of another size
    assert load_dataset(copy / "x.jsonl").fingerprint() != whole
    lines = jsonl_data.read_text().splitlines()
    (copy / "y.jsonl").write_text("\n".join([lines[0].replace("red", "blue"), *lines[1:]]) + "\n")  # another answer
    assert load_dataset(copy / "y.jsonl").fingerprint()["sha256"] != whole["sha256"]
    (copy / "z.jsonl").write_text("\n".join([*lines, "{not json"]) + "\n")  # a broken record past the limit counts
    assert load_dataset(copy / "z.jsonl", limit=2).fingerprint()["records"] == 5


def test_fingerprint_of_embedded_images(tmp_path: Path) -> None:
    def frame(colour: tuple[int, int, int]) -> pd.DataFrame:
        return pd.DataFrame({"id": [1, 2], "image": [png_bytes((0, 0, 0)), png_bytes(colour)], "question": ["q", "q"]})

    frame((0, 0, 255)).to_parquet(tmp_path / "a.parquet")
    frame((0, 0, 255)).to_parquet(tmp_path / "b.parquet")
    frame((0, 255, 0)).to_parquet(tmp_path / "c.parquet")
    a, b, c = (load_dataset(tmp_path / f"{n}.parquet").fingerprint() for n in "abc")
    assert a == b and a != c and a["records"] == 2


def test_check_images_finds_a_missing_image_without_opening_any(jsonl_data: Path) -> None:
    dataset = load_dataset(jsonl_data)
    with pytest.raises(DatasetError, match=r"x.jsonl:line 4: image 'img/missing.png' not found$"):
        dataset.check_images()
    load_dataset(jsonl_data, limit=2).check_images()  # the broken image of line 5 is not opened
