"""The model folder's typed manifest: strict reading (one-line errors naming file and key), compatibility with
folders written before it was typed, and no mutation of what a loaded pipeline holds."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from latentdiff.diffusion.config import DiffusionConfig
from latentdiff.errors import UserError
from latentdiff.models.concat import ConcatKind
from latentdiff.models.conditioning import CondKind
from latentdiff.models.folder import (MANIFEST, Conditioning, DataInfo, FolderKind, Manifest, read_manifest,
                                      save_model_folder)
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.pipelines.generate import Pipeline

TINY_UNET = UNetConfig(model_channels=8, channel_mult=(1, 2), attention_resolutions=(), num_heads=1)

# model_index.json exactly as the code before the typed manifest wrote it (digits-tiny, v-prediction)
OLD_MANIFEST = {
    "channels": 1, "class_names": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"], "components": ["unet"],
    "conditioning": {"guidance": 4.0, "kind": "none"},
    "data": {"fingerprint": "0123abcd", "images": 32, "source": "digits"},
    "diffusion": {"beta_end": None, "beta_start": None, "min_snr_gamma": 5.0, "min_snr_offset": 0.0,
                  "num_timesteps": 1000, "prediction": "v", "schedule": "linear", "weighting": "uniform"},
    "format": "latentdiff", "image_size": 16, "latent_shape": [1, 16, 16], "step": 4, "version": 1}


@pytest.fixture
def folder(tmp_path):
    """A pixel-space model folder whose manifest is the old layout, with random UNet weights."""
    torch.manual_seed(0)
    unet = UNet(TINY_UNET)
    save_model_folder(tmp_path, {"unet": (TINY_UNET.to_dict(), unet.state_dict())},
                      Manifest(image_size=16, channels=1))
    (tmp_path / MANIFEST).write_text(json.dumps(OLD_MANIFEST))
    return tmp_path


def edit(folder, **changes):
    data = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(data | changes))


def test_a_folder_written_before_the_typed_manifest_loads_and_samples(folder):
    m = read_manifest(folder)
    assert (m.image_size, m.channels, m.kind, m.step, m.latent_shape) == (16, 1, FolderKind.DIFFUSION, 4, (1, 16, 16))
    assert m.diffusion == DiffusionConfig(prediction="v") and m.conditioning == Conditioning(CondKind.NONE, 4.0)
    assert m.data == DataInfo("digits", "0123abcd", 32) and m.class_names == tuple("0123456789")
    assert m.concat is None and m.guidance == 1.0  # an unconditional model samples unguided
    images = Pipeline.load(folder).generate(2, 2, 2, "ddim", 0)
    assert images.shape == (2, 1, 16, 16) and images.dtype == torch.uint8
    edit(folder, class_names=None)  # some older folders wrote null
    assert read_manifest(folder).class_names == ()


def test_the_manifest_round_trips_and_keeps_the_json_layout(tmp_path):
    m = Manifest(image_size=32, channels=3, step=7, diffusion=DiffusionConfig(schedule="cosine"),
                 latent_shape=(4, 8, 8), conditioning=Conditioning(CondKind.TEXT, 2.5), concat=ConcatKind.LOW_RES,
                 low_res_size=8, class_names=("a", "b"), source="test", data=DataInfo("shapes", "ff", 3))
    save_model_folder(tmp_path, {}, m)
    data = json.loads((tmp_path / MANIFEST).read_text())
    assert data["concat"] == "low_res" and data["conditioning"] == {"kind": "text", "guidance": 2.5}
    assert data["latent_shape"] == [4, 8, 8] and data["diffusion"]["schedule"] == "cosine"
    assert "scale_factor" not in data  # fields a folder does not have are left out, as before
    assert read_manifest(tmp_path) == m
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.image_size = 64


@pytest.mark.parametrize("changes, message", [
    ({"image_size": "16"}, "model_index.json: image_size: expected int, got '16'"),
    ({"image_size": None}, "model_index.json: image_size: expected int, got None"),
    ({"channels": [1]}, "model_index.json: channels: expected int, got [1]"),
    ({"image_size": 0}, "model_index.json: image_size: must be positive, got 0"),
    ({"conditioning": {"kind": "none", "guidance": "4.0"}},
     "model_index.json: conditioning.guidance: expected float, got '4.0'"),
    ({"conditioning": {"kind": "sketch", "guidance": 4.0}},
     "model_index.json: conditioning.kind: expected one of none, class, text, got 'sketch'"),
    ({"conditioning": [4.0]}, "model_index.json: conditioning: expected a mapping of settings, got [4.0]"),
    ({"diffusion": {"num_timesteps": "1000"}}, "model_index.json: diffusion.num_timesteps: expected int"),
    ({"diffusion": None}, "model_index.json: diffusion: missing (a folder with a unet needs"),
    ({"concat": "sideways"}, "model_index.json: concat: expected one of inpaint, low_res, got 'sideways'"),
    ({"concat": "low_res"}, "model_index.json: low_res_size: a super-resolution model (concat low_res) needs"),
    ({"latent_shape": [1, "16", 16]}, "model_index.json: latent_shape[1]: expected int"),
    ({"imagesize": 16}, "model_index.json: unknown key(s) imagesize"),
    ({"version": 2}, "unsupported format 'latentdiff' version 2"),
])
def test_a_wrong_manifest_value_is_one_error_naming_file_and_key(folder, changes, message):
    edit(folder, **changes)
    with pytest.raises(UserError) as e:
        Pipeline.load(folder)
    assert message in str(e.value) and str(folder / MANIFEST) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["null", "[1, 2]", "16", "\"a string\""])
def test_a_manifest_that_is_not_an_object_is_refused_by_name(folder, text):
    (folder / MANIFEST).write_text(text)
    with pytest.raises(UserError, match=f"{MANIFEST}: expected a JSON object"):
        read_manifest(folder)
    from latentdiff.pipelines.stable_diffusion import load_any

    with pytest.raises(UserError, match=f"{MANIFEST}: expected a JSON object"):
        load_any(folder)  # telling diffusers folders apart reads it too


@pytest.mark.parametrize("component, text", [("unet", "[1, 2]"), ("unet", "null"), ("text_encoder", "null"),
                                             ("text_encoder", "[\"minilm\"]")])
def test_a_component_config_that_is_not_an_object_names_its_file(folder, component, text):
    if component == "text_encoder":
        (folder / "text_encoder").mkdir()
        edit(folder, components=["text_encoder", "unet"])
    (folder / component / "config.json").write_text(text)
    with pytest.raises(UserError, match=f"{component}/config.json: expected a JSON object of settings"):
        Pipeline.load(folder)


def test_a_component_config_error_names_its_file(folder):
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(cfg | {"model_channels": "eight"}))
    with pytest.raises(UserError, match=r"unet/config.json: unet.model_channels: expected int"):
        Pipeline.load(folder)


def test_the_cli_answers_a_broken_manifest_in_one_line(folder):
    (folder / MANIFEST).write_text("null")
    r = subprocess.run([sys.executable, "-m", "latentdiff", "sample", folder, "--steps", "1"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: {folder / MANIFEST}: expected a JSON object of settings, got null"]


def test_autoencoder_and_clip_folders_read_their_own_fields(tmp_path):
    ae = Manifest(image_size=32, channels=3, kind=FolderKind.AUTOENCODER, scale_factor=0.5)
    save_model_folder(tmp_path / "ae", {}, ae)
    assert read_manifest(tmp_path / "ae").scale_factor == 0.5
    clip = Manifest(image_size=32, channels=3, kind=FolderKind.CLIP, context_length=16, width=64,
                    caption_template="a photo of a {}")
    save_model_folder(tmp_path / "clip", {}, clip)
    assert read_manifest(tmp_path / "clip") == clip
    assert json.loads((tmp_path / "clip" / MANIFEST).read_text())["kind"] == "clip"
