"""The README's Python API example runs as printed (on a small model folder in place of runs/mnist)."""

import re
from pathlib import Path

import torch

from latentdiff.diffusion.config import DiffusionConfig
from latentdiff.models.folder import Conditioning, Manifest, save_model_folder
from latentdiff.models.unet import UNet, UNetConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_api_example_runs(tmp_path, capsys):
    section = README.read_text().split("## Python API", 1)[1]
    example = next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "SampleSettings" in b)
    assert len(example.splitlines()) <= 30
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=8, channel_mult=(1, 2), attention_resolutions=(), num_heads=1)
    save_model_folder(tmp_path, {"unet": (cfg.to_dict(), UNet(cfg).state_dict())},
                      Manifest(image_size=16, channels=1, diffusion=DiffusionConfig(), conditioning=Conditioning()))
    scope: dict = {}
    exec(compile(example.replace('"runs/mnist"', repr(str(tmp_path))), "README.md", "exec"), scope)
    assert scope["images"].shape == (4, 1, 16, 16) and scope["redrawn"].shape == (4, 1, 16, 16)
    assert scope["wide"].shape == (8, 1, 16, 32)
    assert "sampler -> sampler: unknown sampler 'plms'" in capsys.readouterr().out
