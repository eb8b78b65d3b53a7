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
        if self.device.type != "cuda":
            for batch in self.batches:
                yield batch.to(self.device)
            return
        copy_stream = torch.cuda.Stream(self.device)
        iterator = iter(self.batches)

        def issue(batch):
            pinned = batch.pin_memory()
            # The side stream must not start before the training stream's earlier work that
            # it could race with (allocations freed back to the caching allocator).
            copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(copy_stream):
                moved = pinned.to(self.device, non_blocking=True)
            return pinned, moved

        try:
            following = next(iterator, None)
            staged = issue(following) if following is not None else None
            while staged is not None:
                _, moved = staged
                training_stream = torch.cuda.current_stream(self.device)
                training_stream.wait_stream(copy_stream)
                # The batch's memory was allocated on the copy stream; tell the allocator it
                # is used on the training stream too, so it is not reused before that is done.
                moved.record_stream(training_stream)
                following = next(iterator, None)
                # Dropping the pinned source is safe: torch's pinned-memory allocator keeps a
                # block until the non-blocking copies that read it have finished.
                staged = issue(following) if following is not None else None
                yield moved
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
