"""Decoding ahead in DataLoader worker processes, in exactly the order training asks for.

Training knows the order of the current epoch (training/loop.py, Batches), so the loader is handed a plan:
this process's rows of the batch wanted now and of every later batch of the epoch. ``workers`` processes
decode it, about ``prefetch`` batches each ahead of the step (torch's DataLoader deals the batches out to
its workers in turn). When training asks for anything but the plan's next batch (a new epoch's order, a
resume), the loader starts over on a new plan; persistent workers make that cheap. The images come in
the plan's order whatever the number of workers: workers change the speed, never the result.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from latentdiff.data.streamed import StreamedImages
from latentdiff.errors import UserError

log = logging.getLogger(__name__)


class _Plan:
    """The DataLoader's batch sampler: the batches of the current plan, made afresh for every pass."""

    def __init__(self) -> None:
        self.make: Callable[[], Iterator[torch.Tensor]] = lambda: iter(())

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in self.make())


class _Decode(Dataset):
    """Whole batches of a streamed data set, decoded in the worker (``__getitems__``)."""

    def __init__(self, data: StreamedImages) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.data.rows([i])

    def __getitems__(self, idx: list[int]) -> dict[str, Any]:
        return self.data.rows(idx)


def _as_is(batch: Any) -> Any:
    return batch  # __getitems__ already stacked the batch


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # a worker decodes with PIL; torch's thread pool would only compete for cores


class Prefetcher:
    """Decoded batches of ``data`` in a planned order, ``workers`` processes ahead (0: decoded on request)."""

    def __init__(self, data: StreamedImages, workers: int, prefetch: int = 2) -> None:
        self._plan = _Plan()
        self._loader = DataLoader(_Decode(data), batch_sampler=self._plan, num_workers=workers, collate_fn=_as_is,
                                  persistent_workers=workers > 0, prefetch_factor=prefetch if workers else None,
                                  worker_init_fn=_one_thread if workers else None)
        self._it: Iterator[dict[str, Any]] | None = None
        self._expect: Iterator[torch.Tensor] = iter(())
        self.replaced, self.first_problem = 0, ""
        self.restarts = 0  # plans started (one per epoch in a steady run)

    def get(self, want: torch.Tensor, later: Iterable[torch.Tensor]) -> dict[str, Any]:
        """Images ``want`` decoded (a dict of StreamedImages.rows); ``later`` (iterable more than once, fixed
        when passed) gives the batches expected to follow."""
        expected = next(self._expect, None)
        if self._it is None or expected is None or not torch.equal(expected, want):
            first = want.clone()
            self._plan.make = lambda: itertools.chain([first], later)  # DataLoader may iterate it more than once
            self._expect = iter(later)  # the same batches, to recognise the ones asked for next
            self._it = iter(self._loader)  # persistent workers drop what they prefetched and follow the new plan
            self.restarts += 1
        got = next(self._it)
        if "error" in got:
            raise UserError(got["error"])
        if got["problems"]:
            if not self.replaced:
                log.warning("%s; replaced by the next readable image (data.on_bad_file=skip)", got["problems"][0])
            self.replaced += len(got["problems"])
            self.first_problem = self.first_problem or got["problems"][0]
        return got

    def close(self) -> None:
        """Stop the worker processes (a summary warning if images were replaced)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._expect = iter(())
        if self.replaced > 1:
            log.warning("%d unreadable image(s) were replaced while reading; first: %s", self.replaced,
                        self.first_problem)
