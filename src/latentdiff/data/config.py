"""Dataset configuration: which images to load, at what size, and how to treat bad files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from latentdiff.errors import UserError
from latentdiff.formats.dataclass_io import ConfigMixin

EMBEDDED = ("mnist5k", "digits", "fashion-mnist", "emoji", "shapes")


@dataclass
class DataConfig(ConfigMixin):
    """Where the images come from and how they are brought to one size and colour mode."""

    section: ClassVar[str] = "data"

    source: str = "mnist5k"  # an embedded name (EMBEDDED) or a path to a folder of images
    image_size: int = 28  # square side in pixels after resizing
    channels: int = 1  # 1 grey or 3 RGB; every image is converted
    center_crop: bool = True  # resize the shorter side then crop the centre; else plain resize
    hflip: bool = False  # random horizontal flip at batch time (the training loop's random_hflip)
    split: str = "train"  # "train" or "test" (held-out 10% unless the source has its own split)
    limit: int | None = None  # keep the first N images after the split
    on_bad_file: str = "skip"  # "skip" (count and warn once) or "fail" (raise naming the file)
    fashion_mnist_dir: str | None = None  # folder with the idx .gz files; default: Debian's path
    captions: str = "auto"  # "auto" (use them if any image has one), "require" (all must) or "ignore"
    caption_column: str = "text"  # the caption key of metadata.jsonl lines (beside "file_name")
    emoji_font: str | None = None  # "emoji" source: a CBDT colour emoji font; default: Noto's path
    shapes_count: int = 20000  # "shapes" source: how many captioned images to draw (before limit)
    two_object_fraction: float = 0.3  # "shapes" source: share of images with two objects and a relation
    # read images from disk as batches need them, decoded in `workers` processes (data/streamed.py);
    # null: yes for a folder of WebDataset .tar shards (`latentdiff data pack`), no for image folders and
    # the embedded sets, which are decoded once into memory
    stream: bool | None = None
    workers: int = 2  # streamed sources: DataLoader worker processes that decode ahead (0: in the training process)
    buckets: str | None = None  # aspect-ratio buckets (streamed): "auto" or "WxH,WxH,..." within image_size² pixels
    bucket_step: int = 64  # buckets=auto: the sides are multiples of this

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> UserError:
            return UserError(f"data.{key}: expected {expected}, got {getattr(self, key)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.source, str) or not self.source:
            raise bad("source", f"one of {', '.join(EMBEDDED)} or a folder path")
        if not is_int(self.image_size) or self.image_size <= 0:
            raise bad("image_size", "a positive integer")
        if not is_int(self.channels) or self.channels not in (1, 3):
            raise bad("channels", "1 (grey) or 3 (RGB)")
        for key in ("center_crop", "hflip"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")
        if self.split not in ("train", "test"):
            raise bad("split", "'train' or 'test'")
        if self.limit is not None and (not is_int(self.limit) or self.limit <= 0):
            raise bad("limit", "a positive integer or null")
        if self.on_bad_file not in ("skip", "fail"):
            raise bad("on_bad_file", "'skip' or 'fail'")
        if self.fashion_mnist_dir is not None and not isinstance(self.fashion_mnist_dir, str):
            raise bad("fashion_mnist_dir", "a folder path or null")
        if self.captions not in ("auto", "require", "ignore"):
            raise bad("captions", "'auto', 'require' or 'ignore'")
        if not isinstance(self.caption_column, str) or not self.caption_column or self.caption_column == "file_name":
            raise bad("caption_column", "a metadata.jsonl key other than 'file_name'")
        if self.emoji_font is not None and (not isinstance(self.emoji_font, str) or not self.emoji_font):
            raise bad("emoji_font", "a font file path or null")
        if not is_int(self.shapes_count) or self.shapes_count <= 0:
            raise bad("shapes_count", "a positive integer")
        frac = self.two_object_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
            raise bad("two_object_fraction", "a number from 0 to 1")
        if self.stream is not None and not isinstance(self.stream, bool):
            raise bad("stream", "true, false or null (automatic)")
        if not is_int(self.workers) or self.workers < 0:
            raise bad("workers", "a non-negative integer")
        if not is_int(self.bucket_step) or self.bucket_step <= 0:
            raise bad("bucket_step", "a positive integer")
        if self.buckets is not None:
            from latentdiff.data.buckets import parse_buckets

            if self.is_embedded:
                raise UserError(f"data.buckets: the embedded set {self.source!r} is square; buckets need a "
                                "folder or shards of images of mixed aspect ratios")
            parse_buckets(self.buckets, self.image_size, self.bucket_step)  # refuses a malformed spec here
            if self.stream is False:
                raise bad("stream", "true or null with data.buckets (images of several sizes are read as needed)")
        if self.stream and self.is_embedded:
            raise bad("stream", f"false or null for the embedded set {self.source!r} (it is held in memory)")

    @property
    def is_embedded(self) -> bool:
        """True when `source` names a dataset that ships with the code rather than a folder."""
        return self.source in EMBEDDED


