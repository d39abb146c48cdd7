"""`python -m fsre_lightning.pseudolabel`: import label PNGs, predict with a tiny SegFormer."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsre_lightning import pseudolabel as pseudolabel_cli
from fsre_lightning.cityscapes import CLASS_NAMES, LABEL_ID_TO_TRAIN_ID
from fsre_lightning.data import KittiDataModule
from fsre_lightning.data import frame_cache as cache_module
from fsre_lightning.data import label_caches as pseudolabel
from fsre_lightning.data.kitti_sources import DEFAULT_SEGMENTATION_MODEL
from fsre_lightning.errors import DataError
from fsre_lightning.testing.kitti_server import DRIVE as SERVED_DRIVE
from fsre_lightning.testing.kitti_server import (
    build_archives,
    make_raw_tree,
    write_published_splits,
)
from fsre_lightning.testing.kitti_tree import DRIVE, expected_train_ids, label_ids_image, make_kitti

H, W = 64, 192


def nearest(labels: np.ndarray, size: tuple[int, int] = (H, W)) -> np.ndarray:
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


def cli(root: Path, cache: Path, *extra: str, source: str = "import") -> list[str]:
    return [source, "--root", str(root), "--split-dir", str(root / "splits" / "tiny"),
            "--split", "train", "val", "--height", str(H), "--width", str(W),
            "--cache-dir", str(cache), "--quiet", *extra]


def test_import_maps_label_ids_to_train_ids(tmp_path: Path, capsys) -> None:
    assert (LABEL_ID_TO_TRAIN_ID[7], LABEL_ID_TO_TRAIN_ID[26], LABEL_ID_TO_TRAIN_ID[0]) == (
        0, 13, 255)
    root = make_kitti(tmp_path)
    cache_dir = tmp_path / "cache"
    assert pseudolabel_cli.main(cli(root, cache_dir)) == 0
    out = capsys.readouterr().out
    assert "labels_files_train_64x192.npy: 4 frames" in out and "labels_files_val" in out

    cache = np.load(cache_dir / "labels_files_train_64x192.npy", allow_pickle=False)
    assert cache.shape == (4, H, W) and cache.dtype == np.uint8
    want = nearest(expected_train_ids())
    assert all(np.array_equal(row, want) for row in cache)
    assert set(np.unique(cache).tolist()) == {0, 10, 13, 255}  # road, sky, car, void
    # the label-id values themselves never leak through
    assert not np.isin(cache, [7, 23, 26]).any()

    # Same cache as the data module's: training opens it without decoding a label again.
    dm = KittiDataModule(root, root / "splits" / "tiny", height=H, width=W, num_workers=0,
                         label_format="label_ids", frame_cache=True, cache_dir=cache_dir,
                         flip_prob=0.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_module, "decode_label", lambda *a: pytest.fail("label cache rebuilt"))
        dm.setup("fit")
    item = dm.datasets["train"][0]
    assert torch.equal(item["labels"], torch.from_numpy(want.astype(np.int64)))


def test_import_train_ids_and_the_label_file_layout(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    label_root = tmp_path / "elsewhere"
    lab = expected_train_ids()
    for f in range(6):  # the reference layout: <root>/<date>/<drive>_sync/image_02/<frame>.png
        path = label_root / DRIVE / "image_02" / f"{f:010d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lab).save(path)
    cache = pseudolabel.import_labels(root, root / "splits" / "tiny" / "train_files.txt",
                                      tmp_path / "cache", (H, W), label_root=label_root,
                                      label_format="train_ids", progress=False)
    assert cache.keys == [f"{DRIVE} {f} l" for f in range(1, 5)]
    assert np.array_equal(cache.read(2), nearest(lab))


def test_missing_labels_are_listed_or_void(tmp_path: Path, capsys) -> None:
    root = make_kitti(tmp_path)
    gone = root / "segmentation" / DRIVE / "image_02" / "0000000003.png"
    gone.unlink()
    assert pseudolabel_cli.main(cli(root, tmp_path / "cache")) == 2
    err = capsys.readouterr().err
    assert "1 pseudo-labels missing" in err and str(gone) in err and "--allow-missing" in err
    assert not (tmp_path / "cache" / "labels_files_train_64x192.npy").exists()

    assert pseudolabel_cli.main(cli(root, tmp_path / "cache", "--allow-missing")) == 0
    assert f"1 without a label (void), e.g. ['{DRIVE} 3 l']" in capsys.readouterr().out
    cache = np.load(tmp_path / "cache" / "labels_files_train_64x192.npy")
    assert np.all(cache[2] == 255) and np.array_equal(cache[1], nearest(expected_train_ids()))


def test_import_names_a_label_of_the_wrong_size(tmp_path: Path, capsys) -> None:
    root = make_kitti(tmp_path)
    bad = root / "segmentation" / DRIVE / "image_02" / "0000000002.png"
    Image.fromarray(label_ids_image((200, 60))).save(bad)
    assert pseudolabel_cli.main(cli(root, tmp_path / "cache")) == 2
    assert str(bad) in capsys.readouterr().err


def test_bad_arguments_are_reported(tmp_path: Path, capsys) -> None:
    root = make_kitti(tmp_path)
    assert pseudolabel_cli.main([*cli(root, tmp_path / "c")[:-1], "--height", "100"]) == 2
    assert "--height=100 is not allowed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pseudolabel_cli.main(["import", "--help"])
    assert "--label-format" in capsys.readouterr().out


def test_predict_needs_the_seg_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"fsre-lightning\[seg\]"):
        pseudolabel.load_segformer("anything", torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_segformer(module_tmp: Callable[[str], Path]) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1],
        hidden_sizes=[8, 16, 16, 16], num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16, num_labels=19)
    torch.manual_seed(0)
    folder = module_tmp("segformer")
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(folder)
    return folder


def test_predict_writes_train_ids_and_resumes(tmp_path: Path, tiny_segformer: Path) -> None:
    root = make_kitti(tmp_path)
    split = root / "splits" / "tiny" / "train_files.txt"
    loads: list[str] = []

    def counting_loader(model: str, device: torch.device, allow_download: bool):
        loads.append(model)
        return pseudolabel.load_segformer(model, device, allow_download)

    args = {"model": str(tiny_segformer), "device": "cpu", "batch_size": 3,
            "infer_size": (64, 224), "progress": False, "workers": 2}
    cache = pseudolabel.predict_labels(root, split, tmp_path / "cache", (H, W),
                                       load_model=counting_loader, **args)
    assert cache.shape == (4, H, W) and cache.array.dtype == np.uint8
    values = np.asarray(cache.array)
    assert values.max() < 19  # argmax train ids, never void for an existing frame
    assert len(loads) == 1

    # the same numbers as running the model by hand on one frame
    net = pseudolabel.load_segformer(str(tiny_segformer), torch.device("cpu"))
    mean, std = pseudolabel.normalisation(str(tiny_segformer))
    frame = root / DRIVE / "image_02" / "data" / "0000000002.png"
    x = torch.from_numpy(pseudolabel.read_for_segformer(frame, (64, 224), mean, std))[None]
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(net(pixel_values=x).logits, size=(H, W),
                                                 mode="bilinear", align_corners=False)
    assert np.array_equal(cache.read(1), logits.argmax(1)[0].numpy().astype(np.uint8))

    # up to date: the model is not even loaded again
    pseudolabel.predict_labels(root, split, tmp_path / "cache", (H, W),
                               load_model=counting_loader, **args)
    assert len(loads) == 1

    # Interrupted after the first batch, then resumed: only the rest is predicted.
    calls = []

    def flaky_loader(model: str, device: torch.device, allow_download: bool):
        net = pseudolabel.load_segformer(model, device, allow_download)

        def forward(pixel_values: torch.Tensor):
            calls.append(len(pixel_values))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return net(pixel_values=pixel_values)
        return forward

    other = tmp_path / "cache2"
    with pytest.raises(KeyboardInterrupt):
        pseudolabel.predict_labels(root, split, other, (H, W), load_model=flaky_loader, **args)
    calls.clear()
    resumed = pseudolabel.predict_labels(root, split, other, (H, W), load_model=flaky_loader,
                                         **args)
    assert calls == [1]  # 3 of 4 frames were done before the interruption
    assert np.array_equal(np.asarray(resumed.array), values)


def test_training_reads_predicted_labels(tmp_path: Path, tiny_segformer: Path, capsys) -> None:
    root = make_kitti(tmp_path)
    cache_dir = tmp_path / "cache"
    dm = KittiDataModule(root, root / "splits" / "tiny", height=H, width=W, num_workers=0,
                         label_source="predicted", cache_dir=cache_dir, flip_prob=0.0)
    with pytest.raises(DataError, match="pseudolabel predict"):
        dm.setup("fit")
    argv = cli(root, cache_dir, "--model", str(tiny_segformer), "--device", "cpu",
               "--infer-size", "64", "224", source="predict")
    assert pseudolabel_cli.main(argv) == 0, capsys.readouterr().err
    dm.setup("fit")
    train = dm.datasets["train"]
    cache = np.load(cache_dir / "labels_predicted_train_64x192.npy")
    for i in range(len(train)):
        assert torch.equal(train[i]["labels"], torch.from_numpy(cache[i].astype(np.int64)))

    # frames replaced after the prediction: the stale labels are refused
    frame = root / DRIVE / "image_02" / "data" / "0000000001.png"
    Image.fromarray(np.zeros((60, 200, 3), np.uint8)).save(frame)
    stale = KittiDataModule(root, root / "splits" / "tiny", height=H, width=W,
                            num_workers=0, label_source="predicted", cache_dir=cache_dir)
    with pytest.raises(DataError, match="other frames"):
        stale.setup("fit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_predict_on_cuda_agrees_with_cpu(tmp_path: Path, tiny_segformer: Path) -> None:
    root = make_kitti(tmp_path)
    split = root / "splits" / "tiny" / "train_files.txt"
    args = {"model": str(tiny_segformer), "batch_size": 4, "infer_size": (64, 224),
            "progress": False}
    cpu = pseudolabel.predict_labels(root, split, tmp_path / "cpu", (H, W), device="cpu", **args)
    gpu = pseudolabel.predict_labels(root, split, tmp_path / "gpu", (H, W), device="cuda",
                                     **args)
    a, b = np.asarray(cpu.array), np.asarray(gpu.array)
    assert a.shape == b.shape and b.max() < 19
    assert (a == b).mean() > 0.99  # float differences may flip near-ties only


# ------------------------------------------------------- the default model and its labels
def test_predict_names_a_cityscapes_segformer_by_its_hub_id_by_default() -> None:
    args = pseudolabel_cli._parser().parse_args(["predict", "--root", "r", "--cache-dir", "c"])
    assert args.model == DEFAULT_SEGMENTATION_MODEL == (
        "nvidia/segformer-b5-finetuned-cityscapes-1024-1024")


@pytest.mark.parametrize(("names", "error"), [
    (list(CLASS_NAMES), None),  # the nvidia Cityscapes SegFormers' id2label
    ([f"LABEL_{i}" for i in range(19)], None),  # no names: taken on the count
    (["sidewalk", "road", *CLASS_NAMES[2:]], "names output 0 'sidewalk' where the Cityscapes "
                                             "train id 0 is 'road' (2 of 19 differ)"),
    ([*CLASS_NAMES[:18], "license plate"], "output 18 'license plate'"),
])
def test_a_model_must_predict_the_cityscapes_train_ids_in_order(names: list[str],
                                                                error: str | None) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(num_labels=19,
                                          id2label=dict(enumerate(names)))
    if error is None:
        pseudolabel.check_cityscapes_labels("m", config)
    else:
        with pytest.raises(DataError, match=re.escape(error)):
            pseudolabel.check_cityscapes_labels("m", config)
    with pytest.raises(DataError, match="predicts 35 classes"):
        pseudolabel.check_cityscapes_labels("m", transformers.SegformerConfig(num_labels=35))


def test_prepare_makes_pseudo_labels_as_one_step(tmp_path: Path, tiny_segformer: Path) -> None:
    """data.download=true with data.prepare.pseudo_labels=predict: the frames from KITTI's
    archives (a local mirror here), then the label caches training reads."""
    site = tmp_path / "site"
    build_archives(make_raw_tree(tmp_path / "raw"), site)
    lines = [f"{SERVED_DRIVE} {f} l" for f in range(1, 5)]
    write_published_splits(site / "splits", {"eigen_zhou": {"train_files.txt": lines,
                                                            "val_files.txt": lines[:2]}})
    dm = KittiDataModule(tmp_path / "kitti", tmp_path / "splits" / "eigen_zhou", height=H,
                         width=W, num_workers=0, frame_cache=False, label_source="predicted",
                         cache_dir=tmp_path / "cache", download=True,
                         prepare={"archive_url": str(site), "splits_url": str(site / "splits"),
                                  "splits": [], "pseudo_labels": "predict",
                                  "label_model": str(tiny_segformer), "label_device": "cpu"})
    dm.prepare_data()
    dm.setup("fit")
    cache = np.load(tmp_path / "cache" / "labels_predicted_train_64x192.npy")
    assert cache.shape == (4, H, W) and cache.max() < 19
    assert torch.equal(dm.datasets["train"][0]["labels"], torch.from_numpy(
        cache[0].astype(np.int64)))
    assert (tmp_path / "cache" / "labels_predicted_val_64x192.npy").is_file()
