"""Low-rank adapters (LoRA, Hu et al. 2021) on our networks: fused into the weights or run beside them.

W' = W + s · B A for each adapted Linear / Conv2d (``s``: the file's alpha / rank times the user's
strength). Fusing costs nothing at sampling time; on the fly (a forward hook adds s · B(A x)) keeps the
weights untouched and several LoRAs can be swapped freely. :func:`remove_lora` undoes both exactly:
fused weights are restored from the copies kept at the first fuse. Which module a file's name means is
told by :func:`unet_lora_names` / :func:`text_lora_names`: every spelling (diffusers', transformers',
CompVis', kohya's underscored) of every adaptable layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from latentdiff.errors import UserError
from latentdiff.formats.clip_keys import clip_text_key_map
from latentdiff.formats.lora import flat_name
from latentdiff.formats.sd_keys import unet_key_map

ADAPTABLE = (nn.Linear, nn.Conv2d)


@dataclass
class LoraState:
    """What :func:`remove_lora` needs to undo every LoRA on a network."""

    originals: dict[str, Tensor] = field(default_factory=dict)  # weights as they were before the first fuse
    hooks: list[RemovableHandle] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # descriptions, for messages


def _spellings(names: dict[str, str], ours: str, *theirs: str) -> None:
    for name in (ours, *theirs):
        names[name] = names[flat_name(name)] = ours


def unet_lora_names(unet: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may give a UNet layer (diffusers' or CompVis', dotted or kohya's) -> our module name."""
    names: dict[str, str] = {}
    for ours_key, theirs_key in unet_key_map(unet.state_dict(), unet.layout).items():
        if ours_key.endswith(".weight") and isinstance(unet.get_submodule(ours_key[:-7]), ADAPTABLE):
            _spellings(names, ours_key[:-7], theirs_key[:-7])
    return names


def text_lora_names(text_model: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may give a CLIP text layer (transformers', with or without ``text_model.``) -> ours."""
    names: dict[str, str] = {}
    keys = list(text_model.state_dict())
    for ours_key, theirs_key in clip_text_key_map(keys).items():
        if ours_key.endswith(".weight") and isinstance(text_model.get_submodule(ours_key[:-7]), ADAPTABLE):
            theirs = theirs_key[:-7]
            _spellings(names, ours_key[:-7], theirs, theirs.removeprefix("text_model."))
    return names


def _factors(module: nn.Module, down: Tensor, up: Tensor, where: str) -> tuple[Tensor, Tensor]:
    """A and B shaped for ``module`` (1x1 convs and Linear layers take either form); a misfit is a UserError."""
    w = module.weight
    if isinstance(module, nn.Linear) or w.shape[2:] == (1, 1):
        if down.ndim == 4 and down.shape[2:] != (1, 1) or up.ndim == 4 and up.shape[2:] != (1, 1):
            raise UserError(f"{where}: a {tuple(down.shape[2:])} LoRA kernel on a layer without one")
        down, up = down.flatten(1), up.flatten(1)
        ok = down.shape[1] == w.shape[1] and up.shape[0] == w.shape[0]
        if isinstance(module, nn.Conv2d):
            down, up = down[:, :, None, None], up[:, :, None, None]
    else:
        up = up.reshape(*up.shape[:2], 1, 1) if up.ndim == 2 else up
        ok = down.ndim == 4 and down.shape[1:] == w.shape[1:] and up.shape[0] == w.shape[0] and up.shape[2:] == (1, 1)
    if not ok:
        raise UserError(f"{where}: LoRA shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the layer's "
                        f"weight {tuple(w.shape)}: the LoRA was made for another model")
    return down, up


def lora_delta(module: nn.Module, down: Tensor, up: Tensor, scale: float, where: str = "LoRA") -> Tensor:
    """s · B A in the shape of ``module.weight`` (float32)."""
    down, up = _factors(module, down.float(), up.float(), where)
    return scale * (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)


def _hook(down: Tensor, up: Tensor, scale: float):
    """A forward hook adding s · B(A x) to a Linear's or Conv2d's output."""
    def add(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        a, b = down.to(x.device, x.dtype), up.to(x.device, x.dtype)
        if isinstance(module, nn.Conv2d):
            h = F.conv2d(F.conv2d(x, a, None, module.stride, module.padding, module.dilation), b)
        else:
            h = F.linear(F.linear(x, a), b)
        return output + scale * h
    return add


def apply_lora(model: nn.Module, layers: list[tuple[str, Tensor, Tensor, float]], fuse: bool = True,
               what: str = "LoRA") -> None:
    """Add ``layers`` (our module name, A, B, s) to ``model``: into the weights (``fuse``) or as forward hooks."""
    state: LoraState = model.__dict__.setdefault("_lora_state", LoraState())
    work = [(name, model.get_submodule(name), down, up, scale) for name, down, up, scale in layers]
    factors = [_factors(module, down, up, f"{what}: {name}") for name, module, down, up, _ in work]  # check all first
    with torch.no_grad():
        for (name, module, down, up, scale), (a, b) in zip(work, factors):
            if fuse:
                if name not in state.originals:
                    state.originals[name] = module.weight.detach().clone()
                module.weight += lora_delta(module, down, up, scale, name).to(module.weight.dtype)
            else:
                state.hooks.append(module.register_forward_hook(_hook(a.float(), b.float(), scale)))
    state.applied.append(f"{what} ({'fused' if fuse else 'on the fly'}, {len(layers)} layers)")


def remove_lora(model: nn.Module) -> list[str]:
    """Undo every LoRA on ``model`` exactly (fused weights restored, hooks removed); returns what was removed."""
    state: LoraState | None = model.__dict__.pop("_lora_state", None)
    if state is None:
        return []
    with torch.no_grad():
        for name, weight in state.originals.items():
            model.get_submodule(name).weight.copy_(weight)
    for handle in state.hooks:
        handle.remove()
    return state.applied


class LoraAdapter(nn.Module):
    """Trainable LoRA factors on named Linear / Conv2d layers of one network, run as forward hooks.

    A starts like a Linear layer's default init (Kaiming uniform), B at zero, so training starts from the
    base model exactly (Hu et al. 2021). ``scale`` = alpha / rank. The parameters live here, not in the
    network, so the base weights stay frozen and only the adapter is saved.
    """

    def __init__(self, model: nn.Module, names: list[str], rank: int, alpha: float) -> None:
        super().__init__()
        self.names, self.scale = list(names), alpha / rank
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for name in self.names:
            w = model.get_submodule(name).weight
            kernel = tuple(w.shape[2:])
            down = torch.empty(rank, *w.shape[1:], device=w.device)
            nn.init.kaiming_uniform_(down.view(rank, -1), a=5 ** 0.5)
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(w.shape[0], rank, *([1] * len(kernel)), device=w.device)))
        self._handles = [model.get_submodule(name).register_forward_hook(_hook(a, b, self.scale))
                         for name, a, b in zip(self.names, self.down, self.up)]

    def detach(self) -> None:
        """Remove the hooks: the network computes without the adapter again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{module name: (A, B)} as detached tensors."""
        return {name: (a.detach(), b.detach()) for name, a, b in zip(self.names, self.down, self.up)}
