"""Commands that prepare data sets: pack an image folder into the shards training streams."""

from __future__ import annotations

import time
from pathlib import Path

import click

from latentdiff.cli.app import cli


@cli.group("data")
def data_group() -> None:
    """Prepare data sets: pack an image folder into WebDataset shards that training streams."""


@data_group.command("pack")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shard-size", default="1000", show_default=True,
              help="Images per shard (1000), or bytes per shard (500MB, 1GiB).")
@click.option("--captions", default="auto", show_default=True, type=click.Choice(["auto", "require", "ignore"]),
              help="As data.captions: use them if any image has one (then all must), demand them, or leave them out.")
@click.option("--caption-column", default="text", show_default=True, help="The caption key of metadata.jsonl lines.")
@click.option("--on-bad-file", default="skip", show_default=True, type=click.Choice(["skip", "fail"]),
              help="Unreadable images: leave them out (counted) or stop, naming the file.")
def data_pack(folder: Path, out: Path, shard_size: str, captions: str, caption_column: str, on_bad_file: str) -> None:
    """Pack FOLDER (images; captions in metadata.jsonl or .txt files; labels from sub-folders) into WebDataset
    tar shards in OUT, each with an index; train on them with data.source=OUT (README: Large data sets)."""
    from latentdiff.data.pack import pack_folder, parse_shard_size

    count, size = parse_shard_size(shard_size)
    t0 = time.perf_counter()
    m = pack_folder(folder, out, count, size, captions, caption_column, on_bad_file,
                    log=lambda msg: click.echo(msg, err=True))
    skipped = f", {m['skipped']} unreadable left out" if m["skipped"] else ""
    click.echo(f"{m['images']} images in {len(m['shards'])} shard(s) in {out} ({time.perf_counter() - t0:.0f} s"
               f"{skipped}); train on them with data.source={out}")
