import pytest
import torch

from latentdiff.training.config import load_config


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_cfg():
    """A run that takes a second or two: digits at 16 px, a 16-channel UNet."""
    return load_config("digits-tiny", ["train.steps=6", "train.checkpoint_every=3", "train.log_every=2",
                                       "train.grid_samples=4", "train.grid_steps=3", "train.warmup_steps=2",
                                       "data.limit=64"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits-tiny model trained 4 steps, shared by a test file's tests (sampling and CLI tests)."""
    from latentdiff.training.diffusion_trainer import DiffusionTrainer

    cfg = load_config("digits-tiny", ["train.steps=4", "train.grid_samples=4", "train.grid_steps=2", "data.limit=32"])
    out = tmp_path_factory.mktemp("run")
    DiffusionTrainer(cfg, out, progress=False).run()
    return out
