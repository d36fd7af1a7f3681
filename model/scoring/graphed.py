"""The whole catalogue on a GPU: the bucketed route sized for a GPU, captured in one CUDA graph per batch size.

On a GPU the CPU-tuned bucketed route is launch-bound: blocks of 16,384 (user, item) pairs (sized for a CPU's L2)
and buckets of at most 2,048 items make a few thousand small kernels per call, each issued from Python (the issue
behind this module measured 264 softmax launches for 64 users, 7 ms of GPU work under 50 ms of CPU). Here the same
`BucketedCatalogue` (same equations, same exactness tests) is built with one bucket per width cap and blocks of
`BLOCK_PAIRS` pairs, so a call is one GEMM-sized op per bucket and hop, and each batch size in `BATCH_SIZES` is
captured once in a CUDA graph and replayed: a call of n users replays the smallest captured size >= n (the padded
rows are scored for user 0 and dropped; a row's scores do not depend on the other rows), a call of more than the
largest size replays it chunk by chunk.

On a CPU nothing is captured and the static buffers are simply scored, so tests exercise the padding and chunking
here. Online feedback rebuilds the touched buckets (`BucketedCatalogue.add_neighbours`) and drops the graphs,
which read the old buckets; the next call of each size captures again.
"""
from __future__ import annotations

import torch

from model.cmn import CMN
from model.scoring.bucketed import BucketedCatalogue
from model.tables import Tables

BATCH_SIZES = (1, 8, 64, 256, 1024)
BLOCK_PAIRS = 1 << 22   # (user, item) pairs per block: 1,024 users take 4,096 items at a time, ~0.8 GiB per activation


class GraphedCatalogue:
    """`BucketedCatalogue.score` at fixed batch sizes, each a CUDA graph on a GPU."""

    def __init__(self, catalogue: BucketedCatalogue, batch_sizes: tuple[int, ...] = BATCH_SIZES):
        self.catalogue = catalogue
        self.batch_sizes = sorted(set(batch_sizes))
        self.device = catalogue.indptr.device
        # size -> (graph or None on a CPU, static users, static scores or None on a CPU)
        self.captured: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor, torch.Tensor | None]] = {}
        # one memory pool for every size: a replay overwrites what the others leave in it, and that is safe
        # because every call copies its graph's scores out before the next replay (and replays never overlap)
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None

    @classmethod
    def build(cls, model: CMN, tables: Tables, indptr: torch.Tensor, indices: torch.Tensor,
              batch_sizes: tuple[int, ...] = BATCH_SIZES, block_pairs: int = BLOCK_PAIRS) -> GraphedCatalogue:
        """One bucket per width cap (chunk_items = the catalogue) and GPU-sized blocks."""
        return cls(BucketedCatalogue(model, tables, indptr, indices, chunk_items=model.cfg.n_items,
                                     block_pairs=block_pairs), batch_sizes)

    def add_neighbours(self, indptr: torch.Tensor, indices: torch.Tensor, touched: torch.Tensor) -> None:
        self.catalogue.add_neighbours(indptr, indices, touched)
        self.captured.clear()

    @torch.no_grad()
    def score(self, users: torch.Tensor) -> torch.Tensor:
        """(U, n_items) scores."""
        out = torch.empty(len(users), self.catalogue.model.cfg.n_items, device=self.device)
        largest = self.batch_sizes[-1]
        for s in range(0, len(users), largest):
            chunk = users[s:s + largest]
            size = next(b for b in self.batch_sizes if b >= len(chunk))
            out[s:s + len(chunk)] = self._replay(size, chunk)[:len(chunk)]
        return out

    def _replay(self, size: int, users: torch.Tensor) -> torch.Tensor:
        if size not in self.captured:
            self.captured[size] = self._capture(size)
        graph, static_users, static_scores = self.captured[size]
        static_users.zero_()
        static_users[:len(users)].copy_(users)
        if graph is None:
            return self.catalogue.score(static_users)
        graph.replay()
        return static_scores

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph | None, torch.Tensor, torch.Tensor | None]:
        static_users = torch.zeros(size, dtype=torch.long, device=self.device)
        if self.device.type != "cuda":
            return None, static_users, None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):   # warm-up on the capturing stream: libraries set up outside the capture
            self.catalogue.score(static_users)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (a server building its next model) does not break the capture
        with torch.cuda.graph(graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
            static_scores = self.catalogue.score(static_users)
        return graph, static_users, static_scores
