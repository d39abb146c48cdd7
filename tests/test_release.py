"""Published-model folders (FSRE-Depth / Monodepth2 .pth files): key layout, exact round trip,
import to a checkpoint, evaluation and fine-tuning from it, and clear errors for bad folders.

The expected keys and shapes are written out here from the reference modules' structure
(torchvision ResNet names, Monodepth2's flat `decoder.<n>` list, `MultiEmbedding`), not taken
from the mapping under test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir

from fsre_lightning.checkpoints import CheckpointMismatchError
from fsre_lightning.config import validate_config
from fsre_lightning.errors import ConfigError
from fsre_lightning.import_reference import main as import_main
from fsre_lightning.models import FSRENetwork, PoseNetwork
from fsre_lightning.module import FSREModule
from fsre_lightning.reference import (
    ReleaseFormatError,
    load_reference_release,
    save_reference_release,
)
from fsre_lightning.runtime import CONFIG_DIR
from fsre_lightning.testing import compose_config, run_main
from fsre_lightning.train import main as train_main
from fsre_lightning.trained import load_initial_weights

SIZE = (64, 192)
# One worker builds the ~150 MB release fixture once for all tests of the module (and the
# module's big files are never on the disk twice at once).
pytestmark = pytest.mark.xdist_group("release")
CH = (16, 32, 64, 128, 256)
TINY_DATA = ["data=synthetic", "data.batch_size=2", "data.num_workers=0",
             "++data.synthetic.num_drives=3", "++data.synthetic.frames_per_drive=8",
             "++data.synthetic.height=64", "++data.synthetic.width=192"]


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BatchNorm statistics and affine parameters and conv biases, in eval mode: a
    loader that drops or swaps any of them changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(1.5)  # makes the CMA branch matter more than at init
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=g)
    return module.eval()


def make_depth(seed: int = 0, **kwargs) -> FSRENetwork:
    torch.manual_seed(seed)
    return randomise(FSRENetwork(encoder="resnet18", pretrained=False, **kwargs), seed)


def make_pose(seed: int = 1, encoder: str = "resnet18") -> PoseNetwork:
    torch.manual_seed(seed)
    return randomise(PoseNetwork(encoder=encoder, pretrained=False), seed)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.rand(1, 3, *SIZE, generator=g), torch.rand(1, 3, *SIZE, generator=g)


@pytest.fixture(scope="module")
def cma_release(module_tmp: Callable[[str], Path]) -> tuple[Path, FSRENetwork, PoseNetwork]:
    """An FSRE-Depth-layout folder (CMA at s = 4, 3, 2, H = 4, r = 2) at 64 x 192."""
    folder = module_tmp("fsre_release")
    depth = make_depth(attention_scale="reference")
    pose = make_pose()
    save_reference_release(depth, pose, folder, *SIZE)
    return folder, depth, pose


@pytest.fixture(scope="module")
def imported(module_tmp: Callable[[str], Path], cma_release) -> tuple[Path, str]:
    """The CMA release imported into a checkpoint by the command, and what it printed."""
    ckpt = module_tmp("imported") / "fsre.ckpt"
    result = run_main(import_main, [str(cma_release[0]), "--out", str(ckpt)])
    assert result.returncode == 0, result.stderr[-3000:]
    return ckpt, result.stdout


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def decoder_keys(prefix: str, heads: dict[int, int]) -> dict[str, tuple[int, ...]]:
    """Monodepth2's flat decoder (ResNet-18 skips): block n = 2 (4 - s) and n + 1, heads from
    n = 10 in ascending scale. {key: shape}."""
    enc = (64, 64, 128, 256, 512)
    out: dict[str, tuple[int, ...]] = {}
    for s in range(4, -1, -1):
        n = 2 * (4 - s)
        first_in = enc[-1] if s == 4 else CH[s + 1]
        second_in = CH[s] + (enc[s - 1] if s > 0 else 0)
        for index, cin in ((n, first_in), (n + 1, second_in)):
            out[f"{prefix}decoder.{index}.conv.conv.weight"] = (CH[s], cin, 3, 3)
            out[f"{prefix}decoder.{index}.conv.conv.bias"] = (CH[s],)
    for k, (s, outputs) in enumerate(sorted(heads.items())):
        out[f"{prefix}decoder.{10 + k}.conv.weight"] = (outputs, CH[s], 3, 3)
        out[f"{prefix}decoder.{10 + k}.conv.bias"] = (outputs,)
    return out


def attention_keys(name: str, layer: int, heads: int = 4, ratio: int = 2) -> dict[str, tuple]:
    c = CH[layer + 1]  # the reference's layer index j sits at decoder scale s = j + 1
    e = ratio * c
    out: dict[str, tuple] = {}
    for conv in ("query_conv", "key_conv", "value_conv"):
        out[f"{name}.{layer}.{conv}.weight"] = (heads * e, c, 1, 1)
        out[f"{name}.{layer}.{conv}.bias"] = (heads * e,)
    out[f"{name}.{layer}.W.0.weight"] = (c, e, 1, 1)
    for stat in ("weight", "bias", "running_mean", "running_var"):
        out[f"{name}.{layer}.W.1.{stat}"] = (c,)
    out[f"{name}.{layer}.W.1.num_batches_tracked"] = ()
    out[f"{name}.{layer}.fuse.0.conv.conv.weight"] = (c, 2 * c, 3, 3)
    out[f"{name}.{layer}.fuse.0.conv.conv.bias"] = (c,)
    out[f"{name}.{layer}.fuse.1.weight"] = (c, c, 1, 1)
    out[f"{name}.{layer}.fuse.1.bias"] = (c,)
    return out


def torchvision_keys(depth: int, in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if in_channels != 3:
        model.conv1 = torch.nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return {f"encoder.{k}": tuple(v.shape) for k, v in model.state_dict().items()}


def shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def outputs(depth: torch.nn.Module, pose: torch.nn.Module | None, x: torch.Tensor,
            y: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = depth(x)
        result = {f"disp{s}": d for s, d in out["disp"].items()}
        if "seg_logits" in out:
            result["seg"] = out["seg_logits"]
        if pose is not None:
            result["axisangle"], result["translation"] = pose(x, y)
    return result


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------- the key layout
def test_fsre_cma_layout_has_the_reference_keys_and_shapes(cma_release) -> None:
    folder, _, _ = cma_release
    assert sorted(p.name for p in folder.iterdir()) == [
        "decoder.pth", "encoder.pth", "opt.json", "pose.pth", "pose_encoder.pth"]
    encoder = load(folder / "encoder.pth")
    assert (encoder["height"], encoder["width"]) == SIZE
    assert shapes(encoder) == torchvision_keys(18)  # fc included: the reference loads strictly

    expected = {**decoder_keys("depth_decoder.", {0: 1, 1: 1, 2: 1, 3: 1}),
                **decoder_keys("seg_decoder.", {0: 19})}
    for layer in (3, 2, 1):  # the reference's default cma_layers = decoder scales 4, 3, 2
        expected.update(attention_keys("att_d_to_s", layer))
        expected.update(attention_keys("att_s_to_d", layer))
    assert shapes(load(folder / "decoder.pth")) == expected

    assert shapes(load(folder / "pose_encoder.pth")) == torchvision_keys(18, in_channels=6)
    assert shapes(load(folder / "pose.pth")) == {
        "net.0.weight": (256, 512, 1, 1), "net.0.bias": (256,),
        "net.1.weight": (256, 256, 3, 3), "net.1.bias": (256,),
        "net.2.weight": (256, 256, 3, 3), "net.2.bias": (256,),
        "net.3.weight": (6, 256, 1, 1), "net.3.bias": (6,)}
    options = json.loads((folder / "opt.json").read_text())
    assert options["cma_layers"] == [3, 2, 1] and options["num_layers"] == 18
    assert options["num_head"] == 4 and options["head_ratio"] == 2 and not options["no_cma"]


def test_values_land_where_the_reference_reads_them(cma_release) -> None:
    folder, depth, pose = cma_release
    decoder, encoder = load(folder / "decoder.pth"), load(folder / "encoder.pth")
    ours = depth.state_dict()
    pairs = {
        "encoder.layer3.1.bn2.running_var": "encoder.model.layer3.1.bn2.running_var",
        "depth_decoder.decoder.0.conv.conv.weight": "depth_decoder.upconv0.4.conv.1.weight",
        "depth_decoder.decoder.7.conv.conv.bias": "depth_decoder.upconv1.1.conv.1.bias",
        "depth_decoder.decoder.13.conv.weight": "depth_decoder.heads.3.1.weight",
        "seg_decoder.decoder.10.conv.bias": "seg_decoder.heads.0.1.bias",
        "att_d_to_s.3.key_conv.weight": "cma_depth.4.key.weight",
        "att_s_to_d.1.W.1.running_mean": "cma_seg.2.project.1.running_mean",
        "att_s_to_d.2.fuse.0.conv.conv.weight": "cma_seg.3.fuse.0.conv.1.weight",
    }
    for theirs, mine in pairs.items():
        source = encoder if theirs.startswith("encoder.") else decoder
        assert torch.equal(source[theirs], ours[mine]), theirs
    assert torch.equal(load(folder / "pose.pth")["net.3.weight"],
                       pose.state_dict()["decoder.6.weight"])


@pytest.mark.parametrize("segmentation", [True, False], ids=["no_cma_seg", "monodepth2"])
def test_layouts_without_cma(tmp_path: Path, segmentation: bool) -> None:
    depth = make_depth(cma_scales=[], segmentation=segmentation)
    save_reference_release(depth, None, tmp_path, *SIZE)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["depth.pth", "encoder.pth", "opt.json"]
                     + (["seg.pth"] if segmentation else []))
    assert shapes(load(tmp_path / "depth.pth")) == decoder_keys("", {0: 1, 1: 1, 2: 1, 3: 1})
    if segmentation:
        assert shapes(load(tmp_path / "seg.pth")) == decoder_keys("", {0: 19})
    release = load_reference_release(tmp_path)
    assert release.pose is None and release.layout.cma_scales == ()
    assert release.layout.segmentation is segmentation


# ---------------------------------------------------------------------------- exact round trip
def test_round_trip_cma_gives_identical_outputs(cma_release, images) -> None:
    folder, depth, pose = cma_release
    release = load_reference_release(folder)
    layout = release.layout
    assert (layout.encoder, layout.cma_scales, layout.disp_scales) == (
        "resnet18.tv_in1k", (4, 3, 2), (0, 1, 2, 3))
    assert (layout.num_heads, layout.head_ratio, layout.num_classes) == (4, 2.0, 19)
    assert (release.height, release.width) == SIZE
    assert not release.depth.training and not release.pose.training
    expected, got = outputs(depth, pose, *images), outputs(release.depth, release.pose, *images)
    assert max_diff(expected, got) == 0.0
    # every tensor of the files is used or named as ignored: only the two classifiers here
    # (height and width are read: the training resolution, never listed as not loaded)
    assert sorted(n.split(" ")[1] for n in release.ignored) == sorted(
        ["encoder.fc.weight", "encoder.fc.bias", "encoder.fc.weight", "encoder.fc.bias"])


@pytest.mark.slow
def test_round_trip_resnet50_depth_only(tmp_path: Path, images) -> None:
    torch.manual_seed(0)
    depth = randomise(FSRENetwork(encoder="resnet50", cma_scales=[], segmentation=False), 2)
    pose = make_pose(3)
    save_reference_release(depth, pose, tmp_path, *SIZE)
    assert shapes(load(tmp_path / "encoder.pth")) == torchvision_keys(50)
    release = load_reference_release(tmp_path)
    assert release.layout.encoder == "resnet50.tv_in1k" and not release.layout.segmentation
    assert max_diff(outputs(depth, pose, *images), outputs(release.depth, release.pose, *images)
                    ) == 0.0


@pytest.mark.slow
def test_paper_attention_scaling_is_folded_into_the_queries(tmp_path: Path, images) -> None:
    depth = make_depth(seed=4, attention_scale="paper", num_heads=2, cma_scales=[4, 3])
    save_reference_release(depth, None, tmp_path, *SIZE)
    saved_query = load(tmp_path / "decoder.pth")["att_d_to_s.3.query_conv.weight"]
    assert torch.allclose(saved_query, depth.state_dict()["cma_depth.4.query.weight"] * 2 ** 0.5)
    expected = outputs(depth, None, *images)
    as_reference = load_reference_release(tmp_path)
    as_paper = load_reference_release(tmp_path, attention_scale="paper")
    assert as_reference.layout.num_heads == 2
    # sqrt(2) is not exact in float32: rounding only (the acceptance bound is 1e-4)
    assert max_diff(expected, outputs(as_reference.depth, None, *images)) < 1e-4
    assert max_diff(expected, outputs(as_paper.depth, None, *images)) < 1e-4
    # and the scaling matters: the same weights under the other scaling differ
    wrong = FSRENetwork(encoder="resnet18", num_heads=2, cma_scales=[4, 3],
                        attention_scale="reference").eval()
    wrong.load_state_dict(depth.state_dict())
    assert max_diff(expected, outputs(wrong, None, *images)) > 1e-3


@pytest.mark.slow
def test_monodepth2_two_frame_pose_decoder_and_extras(tmp_path: Path, images) -> None:
    """Monodepth2 predicts two frames (12 outputs, the first six used), stores use_stereo, and
    a release from PyTorch < 0.4.1 has no num_batches_tracked."""
    depth = make_depth(cma_scales=[], segmentation=False, disp_scales=[0, 1, 2, 3])
    pose = make_pose()
    save_reference_release(depth, pose, tmp_path, *SIZE)
    (tmp_path / "opt.json").unlink()
    state = load(tmp_path / "pose.pth")
    state["net.3.weight"] = torch.cat([state["net.3.weight"], torch.randn(6, 256, 1, 1)])
    state["net.3.bias"] = torch.cat([state["net.3.bias"], torch.randn(6)])
    torch.save(state, tmp_path / "pose.pth")
    encoder = load(tmp_path / "encoder.pth")
    encoder["use_stereo"] = False
    encoder = {k: v for k, v in encoder.items() if not k.endswith("num_batches_tracked")}
    torch.save(encoder, tmp_path / "encoder.pth")
    release = load_reference_release(tmp_path)
    assert max_diff(outputs(depth, pose, *images), outputs(release.depth, release.pose, *images)
                    ) == 0.0
    notes = "\n".join(release.ignored)
    assert "net.3.weight[6:12]" in notes and "use_stereo" in notes


def test_fewer_disparity_scales_and_opt_json(tmp_path: Path) -> None:
    depth = make_depth(cma_scales=[4, 3, 2, 1], disp_scales=[0], num_heads=1, head_ratio=1.0)
    save_reference_release(depth, None, tmp_path, 96, 320)
    release = load_reference_release(tmp_path)
    assert release.layout.disp_scales == (0,) and release.layout.cma_scales == (4, 3, 2, 1)
    assert (release.layout.num_heads, release.layout.head_ratio) == (1, 1.0)
    assert (release.height, release.width) == (96, 320)
    options = json.loads((tmp_path / "opt.json").read_text())
    options["num_head"] = 2
    (tmp_path / "opt.json").write_text(json.dumps(options))
    with pytest.raises(ReleaseFormatError, match=r"decoder\.pth.*num_heads=2 \(from .*opt\.json\) "
                                                r"and head_ratio=1 \(from .*opt\.json\)"):
        load_reference_release(tmp_path)
    options.update(num_head=1, cma_layers=[3, 2, 1])
    (tmp_path / "opt.json").write_text(json.dumps(options))
    with pytest.raises(ReleaseFormatError, match=r"opt\.json: cma_layers=\[3, 2, 1\] but the "
                                                r"weights .* have cma_layers=\[0, 1, 2, 3\]"):
        load_reference_release(tmp_path)


# ---------------------------------------------------------------------------- bad input
def test_folder_without_encoder(tmp_path: Path, cma_release) -> None:
    (tmp_path / "decoder.pth").write_bytes((cma_release[0] / "decoder.pth").read_bytes())
    with pytest.raises(ReleaseFormatError, match=r"no encoder\.pth.*found \['decoder\.pth'\]"):
        load_reference_release(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference_release(tmp_path / "missing")


def _copy(src: Path, dst: Path, *leave_out: str) -> Path:
    """`dst` with a link to each file of `src` but `leave_out`, which the test writes itself
    (writing to a link would change `src`, the module's release): ~150 MB less a copy."""
    dst.mkdir()
    for path in src.iterdir():
        if path.name not in leave_out:
            (dst / path.name).symlink_to(path)
    return dst


@pytest.mark.slow
def test_state_dict_of_another_architecture(tmp_path: Path, cma_release) -> None:
    folder = _copy(cma_release[0], tmp_path / "vgg", "encoder.pth")
    vgg = torchvision.models.vgg11(weights=None).features.state_dict()
    torch.save({f"encoder.{k}": v for k, v in vgg.items()}, folder / "encoder.pth")
    with pytest.raises(ReleaseFormatError, match=r"encoder\.pth: no key 'encoder\.conv1\.weight'"):
        load_reference_release(folder)
    # our own network's state dict is not the reference layout either
    folder = _copy(cma_release[0], tmp_path / "ours", "decoder.pth")
    torch.save(cma_release[1].state_dict(), folder / "decoder.pth")
    with pytest.raises(ReleaseFormatError, match=r"decoder\.pth: no output head"):
        load_reference_release(folder)
    # a Monodepth2 decoder of a ResNet-50 beside a ResNet-18 encoder: shapes name the keys
    folder = _copy(cma_release[0], tmp_path / "r50")
    r50 = FSRENetwork(encoder="resnet50", cma_scales=[], segmentation=False)
    save_reference_release(r50, None, tmp_path / "r50_release", *SIZE)
    (folder / "decoder.pth").unlink()
    (folder / "opt.json").unlink()  # it says "CMA on", which would be reported first
    (folder / "depth.pth").write_bytes((tmp_path / "r50_release" / "depth.pth").read_bytes())
    with pytest.raises(ReleaseFormatError,
                       match=r"depth\.pth: decoder\.0\.conv\.conv\.weight has shape "
                             r"\(256, 2048, 3, 3\), expected \(256, 512, 3, 3\)"):
        load_reference_release(folder)


@pytest.mark.slow
def test_missing_unexpected_and_truncated(tmp_path: Path, cma_release) -> None:
    folder = _copy(cma_release[0], tmp_path / "edited", "decoder.pth")
    state = load(cma_release[0] / "decoder.pth")
    del state["depth_decoder.decoder.3.conv.conv.bias"]
    state["att_d_to_s.3.extra"] = torch.zeros(1)
    torch.save(state, folder / "decoder.pth")
    with pytest.raises(ReleaseFormatError) as err:
        load_reference_release(folder)
    message = str(err.value)
    assert "decoder.pth: missing depth_decoder.decoder.3.conv.conv.bias" in message
    assert "unexpected att_d_to_s.3.extra" in message

    folder = _copy(cma_release[0], tmp_path / "truncated", "decoder.pth")
    data = (cma_release[0] / "decoder.pth").read_bytes()
    (folder / "decoder.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReleaseFormatError, match=r"decoder\.pth cannot be read.*truncated"):
        load_reference_release(folder)

    folder = _copy(cma_release[0], tmp_path / "half_pose")
    (folder / "pose.pth").unlink()
    with pytest.raises(ReleaseFormatError, match=r"pose_encoder\.pth but no pose\.pth"):
        load_reference_release(folder)


def test_cma_heads_that_do_not_fit_the_given_h_and_ratio(cma_release) -> None:
    folder = cma_release[0]
    with pytest.raises(ReleaseFormatError,
                       match=r"decoder\.pth: att_d_to_s\.3\.query_conv\.weight has shape "
                             r"\(2048, 256, 1, 1\).*H = 4 embeddings of C' = 512.*"
                             r"num_heads=2 \(given\) and head_ratio=2 \(given\) expect "
                             r"query_conv \(1024, 256, 1, 1\)"):
        load_reference_release(folder, num_heads=2, head_ratio=2.0)
    with pytest.raises(ReleaseFormatError,
                       match=r"head_ratio=1 \(given\) expect .* W\.0 \(256, 256"):
        load_reference_release(folder, num_heads=4, head_ratio=1.0)
    assert load_reference_release(folder, num_heads=4, head_ratio=2.0).layout.num_heads == 4


def test_what_the_reference_layout_cannot_hold(tmp_path: Path) -> None:
    cases = [
        (FSRENetwork(encoder="resnet18", cma_targets=["depth"]), "both decoders"),
        (FSRENetwork(encoder="resnet18", cma_scales=[], num_classes=7), "19 outputs"),
        (FSRENetwork(encoder="resnet18d", cma_scales=[], segmentation=False),
         "torchvision ResNet encoders only"),
    ]
    for net, message in cases:
        with pytest.raises(ValueError, match=message):
            save_reference_release(net, None, tmp_path, *SIZE)
    with pytest.raises(ValueError, match="multiple of 32"):
        save_reference_release(cases[2][0], None, tmp_path, 100, 192)
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------- import, evaluate
@pytest.mark.slow
def test_import_then_evaluate_end_to_end(tmp_path: Path, cma_release, images,
                                         imported: tuple[Path, str]) -> None:
    _, depth, pose = cma_release
    ckpt, printed = imported
    assert "ResNet-18" in printed and "s = 4, 3, 2 (paper l = 0, 1, 2)" in printed
    assert "H = 4 x r = 2" in printed and "64 x 192" in printed and "parameters" in printed

    module = FSREModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    assert module.hparams["network"]["attention_scale"] == "reference"
    assert max_diff(outputs(depth, pose, *images), outputs(module.net, module.pose_net, *images)
                    ) == 0.0

    from fsre_lightning.evaluate import run

    base = [f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'outputs'}", *TINY_DATA]
    cfg = compose_config("evaluate", [*base, f"ckpt_path={ckpt}"])
    results = run(cfg)
    assert results["num_frames"] == 6 and 0 < results["abs_rel"] < 10
    # the release's own training size, stored in the checkpoint, not data.height (96)
    assert (results["settings"]["height"], results["settings"]["width"]) == SIZE


def test_import_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert import_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsre_lightning.import_reference: error: ")
    assert "no encoder.pth" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- fine-tuning
@pytest.mark.slow
def test_init_weights_from_checkpoint_and_folder(cma_release, images,
                                                 imported: tuple[Path, str]) -> None:
    folder, depth, pose = cma_release
    ckpt, _ = imported
    expected = outputs(depth, pose, *images)
    network = {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "resnet18"}
    pose_cfg = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "resnet18"}
    for source in (ckpt, folder):  # the paper-scaled config gets exactly rescaled queries
        module = FSREModule(network=network, pose_network=pose_cfg).eval()
        assert "initialised" in load_initial_weights(module, source)
        assert max_diff(expected, outputs(module.net, module.pose_net, *images)) < 1e-4
    baseline = FSREModule(network={**network, "cma_scales": [], "segmentation": False},
                          pose_network=pose_cfg)
    with pytest.raises(CheckpointMismatchError, match=r"cma_depth.*model\.network\.cma_scales="
                                                      r"\[4, 3, 2\]"):
        load_initial_weights(baseline, ckpt)


def test_init_weights_config_key(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"init_weights={tmp_path}", "ckpt_path=x.ckpt"])
        validate_config(compose("train", overrides=[f"init_weights={tmp_path}",
                                                    "ckpt_path=auto"]), "train")
    with pytest.raises(ConfigError, match=r"init_weights=.*ckpt_path='x\.ckpt'"):
        validate_config(cfg, "train")


@pytest.mark.slow
def test_train_fine_tunes_from_an_imported_release(command_root: Path,
                                                   imported: tuple[Path, str]) -> None:
    tmp_path = command_root
    ckpt, _ = imported
    # The weights alone at the end and no best checkpoint: a ResNet-18 FSRE's full last.ckpt
    # is ~400 MB, and only its existence is checked.
    args = [*TINY_DATA, "logger=csv", "data.height=64", "data.width=192",
            "model.network.encoder=resnet18", "model.network.pretrained=false",
            "model.pose_network.encoder=resnet18", "trainer.max_steps=1",
            "trainer.limit_val_batches=1", "callbacks.progress_bar=null",
            "final_checkpoint=weights", "callbacks.best_checkpoint=null",
            f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_main(train_main, [*args, f"init_weights={ckpt}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised the network weights from the checkpoint" in result.stdout + result.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

    # another architecture fails before training, naming the settings to change
    from fsre_lightning.train import run

    overrides = [f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
                 f"paths.output_dir={tmp_path / 'outputs'}", f"paths.run_dir={tmp_path / 'bad'}",
                 *[a for a in args if not a.startswith("hydra.")], "model=monodepth2",
                 f"init_weights={ckpt}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(CheckpointMismatchError, match=r"init_weights=.*model\.network\."
                                                      r"segmentation=True") as err:
        run(cfg)
    # the way out names the key that was set (it said "start without ckpt_path")
    assert "start without init_weights" in str(err.value)
    assert "ckpt_path" not in str(err.value)
