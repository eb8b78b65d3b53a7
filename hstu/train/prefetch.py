"""Host-to-device copies that overlap the previous step.

A batch copied with `.to(device)` from ordinary (pageable) host memory is copied synchronously:
the host waits for the copy, and the copy waits for the GPU's queue. Here each batch is pinned
and copied on a side CUDA stream as soon as it arrives, one step ahead, so the copy engine moves
batch k+1 while the GPU computes step k; the training stream waits only for that copy (an event,
not the host). On CPU the batches pass through `.to(device)` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class DevicePrefetcher:
    """Iterates over `batches` (JaggedBatch on the host), yielding each on `device`; on CUDA,
    batch k+1's copy is issued before batch k is handed out."""

    def __init__(self, batches: Iterable, device: torch.device) -> None:
        self.batches = batches
        self.device = torch.device(device)

    def __iter__(self) -> Iterator:
        iterator = iter(self.batches)
        try:
            if self.device.type == "cuda":
                yield from self._overlapped(iterator)
            else:
                for batch in iterator:
                    yield batch.to(self.device)
        finally:
            # Stop the data pipeline's producer thread when the pass is left early, not at
            # garbage collection.
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _overlapped(self, iterator) -> Iterator:
        copy_stream = torch.cuda.Stream(self.device)

        def issue(batch):
            # No wait on the training stream is needed first: the copy writes memory the
            # caching allocator gives the copy stream, which record_stream below keeps from
            # reuse until the training stream is done with it.
            pinned = batch.pin_memory()
            with torch.cuda.stream(copy_stream):
                moved = pinned.to(self.device, non_blocking=True)
            return pinned, moved

        following = next(iterator, None)
        staged = issue(following) if following is not None else None
        while staged is not None:
            _, moved = staged
            training_stream = torch.cuda.current_stream(self.device)
            training_stream.wait_stream(copy_stream)
            # The batch's memory was allocated on the copy stream; tell the allocator it is
            # used on the training stream too, so it is not reused before that is done.
            moved.record_stream(training_stream)
            following = next(iterator, None)
            # Dropping the pinned source is safe: torch's pinned-memory allocator keeps a block
            # until the non-blocking copies that read it have finished.
            staged = issue(following) if following is not None else None
            yield moved
