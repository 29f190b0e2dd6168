"""Training CLIP on captioned images: a BPE tokenizer trained on the captions, a causal text transformer
shaped like SD's, a small ViT, and the symmetric contrastive loss (CLIP, DESIGN.md).

The exported model folder holds ``clip/`` (both towers, for zero-shot use), ``text_encoder/`` (the text
tower alone with its tokenizer: give the folder to a diffusion run as ``cond.text_encoder``) and
``tokenizer/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import torch
from torch import nn

from latentdiff.data import ImageData, load_dataset
from latentdiff.data.images import make_grid, save_png
from latentdiff.errors import UserError
from latentdiff.eval.zero_shot import confusion_matrix, zero_shot_predict
from latentdiff.models.clip import CLIPFeatures, CLIPModel, CLIPTextEncoder, clip_logits, clip_loss
from latentdiff.models.folder import DataInfo, FolderKind, Manifest, save_model_folder
from latentdiff.models.tokenizer import TrainedTokenizer, load_tokenizer
from latentdiff.training.checkpoints import latest_checkpoint
from latentdiff.training import distributed
from latentdiff.training.loop import Batch, TrainingRun

EVAL_IMAGES = 1000  # held-out images for the zero-shot confusion matrix of each preview


def captions_for(data: ImageData, template: str | None) -> list[str]:
    """The data's own captions, else ``template`` filled with each image's class name."""
    if data.captions is not None:
        return list(data.captions)
    if template is not None and data.labels is not None:
        return [template.format(data.class_names[int(i)]) for i in data.labels]
    how = ("set clip.caption_template (e.g. 'a photo of a {}') to caption each image by its class"
           if data.labels is not None else
           "add captions to the image folder (metadata.jsonl lines with file_name and text, or a .txt beside each "
           "image), or use a labelled source with clip.caption_template")
    raise UserError(f"CLIP needs captions but data.source {data.source!r} has none: {how}")


def class_prompts(data: ImageData, template: str | None) -> list[str]:
    """One prompt per class for zero-shot classification (the template, or the bare class name)."""
    return [template.format(n) if template else n for n in data.class_names]


class CLIPTrainer(TrainingRun):
    """Trains CLIPModel with clip_loss on (image, caption) pairs; exports CLIP, its text encoder and tokenizer."""

    kind = "CLIP"

    def build(self) -> None:
        """Tokenizer trained on the captions (or the run's own on resume), captions tokenized once, model, AdamW."""
        c, d, tc = self.cfg.clip, self.cfg.data, self.cfg.train
        captions = captions_for(self.data, c.caption_template)
        if latest_checkpoint(self.out / "checkpoints") is not None:  # resuming: the weights belong to this tokenizer
            self.tokenizer = load_tokenizer(self.out / "tokenizer")
        else:  # saved now, so a resume reads these ids even if a newer tokenizers library would train others
            with distributed.main_first(self.dist):  # rank 0 trains and saves it; the other ranks read it
                if self.dist.is_main:
                    self.tokenizer = TrainedTokenizer.train(captions, vocab_size=c.vocab_size,
                                                            context_length=c.context_length)
                    self.tokenizer.save(self.out / "tokenizer")
                else:
                    self.tokenizer = load_tokenizer(self.out / "tokenizer")
        unique = {t: i for i, t in enumerate(dict.fromkeys(captions))}  # class-name captions repeat a lot
        rows = torch.tensor([unique[t] for t in captions], dtype=torch.long)
        self.ids = self.tokenizer(list(unique))[rows]  # (N, L): tokenized once; a batch is a row lookup
        text_cfg = c.text_config(self.tokenizer.vocab_size, self.tokenizer.eos_id)
        self.model = CLIPModel(text_cfg, c.vision_config(d.image_size, d.channels)).to(self.device)
        # CLIP's AdamW: β2 = 0.98, ε = 1e-6; no decay on gains, biases and the temperature
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.opt = self.adamw(groups, lr=tc.lr, betas=(0.9, 0.98), eps=1e-6)
        self.train_model = self.parallel(CLIPFeatures(self.model))
        self._eval_data: ImageData | None = None

    def modules(self) -> dict[str, nn.Module]:
        """The CLIP model (both towers, projections and temperature)."""
        return {"model": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One AdamW."""
        return {"model": self.opt}

    def fingerprint(self) -> str:
        """Data and token ids together: a changed tokenizer or caption template also refuses a resume."""
        h = hashlib.sha256(self.data.fingerprint.encode())
        h.update(self.ids.numpy().tobytes())
        return h.hexdigest()

    def train_step(self) -> dict[str, float]:
        """One AdamW step on a batch of (image, caption) pairs.

        Under torchrun the embeddings of all processes are gathered, so the contrastive loss sees the
        whole global batch, as one process would; with train.grad_accum > 1 each micro-step is its own
        contrastive batch (fewer negatives per image than one step on the whole batch).
        """
        batch = self.draw()
        logs = self.accumulate(batch, self.micro_loss, self.opt)
        self.optimizer_step(self.opt, self.model.parameters(), skip=self.check_finite(logs["loss"]))
        return logs

    def micro_loss(self, part: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """clip_loss of this micro-step's pairs over all processes, the in-batch accuracy and e^τ."""
        x = self.images(part)  # first: an unreadable streamed image's stand-in brings its caption (part["idx"])
        ids = self.ids[part["idx"]].to(self.device)
        with self.autocast():
            image, text, scale = self.train_model(x, ids)
        image, text = distributed.gather_with_grad(image.float()), distributed.gather_with_grad(text.float())
        logits = clip_logits(image, text, scale.float())
        loss = clip_loss(logits)
        with torch.no_grad():  # a caption equal to the image's own counts as correct (class-name captions repeat)
            all_ids = distributed.gather_with_grad(ids)
            acc = (all_ids[logits.argmax(dim=1)] == all_ids).all(dim=1).float().mean()
        return loss, {"loss": float(loss.detach()), "acc": float(acc), "logit_scale": float(scale.detach())}

    def text_encoder(self) -> CLIPTextEncoder:
        """The text tower with its tokenizer: the conditioning of a text-to-image diffusion model."""
        return CLIPTextEncoder(self.tokenizer, self.model.text)

    def export(self) -> None:
        """Write ``clip/``, ``text_encoder/`` (with its tokenizer), ``tokenizer/`` and the manifest."""
        d, c = self.cfg.data, self.cfg.clip
        self.tokenizer.save(self.out / "tokenizer")
        manifest = Manifest(image_size=d.image_size, channels=d.channels, kind=FolderKind.CLIP, step=self.step,
                            context_length=c.context_length, width=c.text_width,
                            class_names=tuple(self.data.class_names or ()), caption_template=c.caption_template,
                            data=DataInfo(d.source, self.data.fingerprint, len(self.data)))
        save_model_folder(self.out, {"clip": (self.model.config_dict(), self.model.state_dict())}, manifest,
                          {"text_encoder": self.text_encoder().save})

    def eval_data(self) -> ImageData:
        """Up to EVAL_IMAGES held-out images (the test split), or training images when that split is empty."""
        if self._eval_data is None:
            try:
                self._eval_data = load_dataset(dataclasses.replace(self.cfg.data, split="test", limit=EVAL_IMAGES))
            except UserError:
                self._eval_data = self.data
        return self._eval_data

    @torch.no_grad()
    def preview(self) -> Path:
        """Zero-shot confusion matrix on held-out images (rows: true class, columns: predicted), or the log.

        The class prompts are ``clip.caption_template`` filled with each class name (else the bare names).
        """
        if self.data.labels is None or not self.data.class_names:
            return self.out / "metrics.csv"  # no classes to name: the loss and in-batch accuracy log
        data = self.eval_data()
        n, k = min(len(data), EVAL_IMAGES), len(data.class_names)
        pred = zero_shot_predict(self.model, self.tokenizer, data.images[:n],
                                 class_prompts(data, self.cfg.clip.caption_template))
        counts = confusion_matrix(pred, data.labels[:n], k).float()
        accuracy = float(counts.diag().sum() / counts.sum())
        rows = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)  # fraction of each true class
        cell = max(8, 256 // k)
        image = (rows * 255).round().to(torch.uint8)[None].repeat_interleave(cell, 1).repeat_interleave(cell, 2)
        path = self.out / "samples" / f"zero_shot_{self.step:08d}.png"
        save_png(make_grid(image[None], pad=0), path,
                 {"step": self.step, "kind": "zero-shot confusion", "accuracy": accuracy, "images": n,
                  "classes": data.class_names})
        print(f"zero-shot accuracy {accuracy:.3f} on {n} images ({k} classes, chance {1 / k:.3f}): {path}",
              file=sys.stderr)
        return path
