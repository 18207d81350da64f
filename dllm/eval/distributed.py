"""Data-parallel evaluation inside one job: ``torchrun --nproc_per_node N run.py ...`` (or
``accelerate launch``). Every rank loads the model and generates its share of lm-eval's requests
(lm-eval splits the documents rank::world_size); rank 0 gathers the samples and metrics, scores, and
writes the one record. Throughput = tokens summed over ranks / the longest rank's generation time.

Nothing here runs unless ``WORLD_SIZE`` > 1: a plain ``python run.py`` never touches
``torch.distributed``. Backend: nccl when the model runs on CUDA (one GPU per rank, ``LOCAL_RANK``),
gloo on CPU.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DataParallel:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DataParallel | None":
        """The launcher's ranks (torchrun / accelerate set RANK, WORLD_SIZE, LOCAL_RANK); None for one process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return None
        try:
            rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        except KeyError as err:
            raise ValueError(f"WORLD_SIZE={world_size} but {err.args[0]} is not set: start data-parallel runs with torchrun") from err
        return cls(rank, world_size, local_rank)

    def pin_device(self, device: str) -> None:
        """Give each rank its own GPU (``LOCAL_RANK``) before anything touches CUDA."""
        if device not in ("auto", "cuda") and device.startswith("cuda"):
            raise ValueError(
                f"device={device!r} with WORLD_SIZE={self.world_size} would put every rank on one GPU; "
                "use device=auto or device=cuda (each rank takes cuda:LOCAL_RANK)"
            )
        if device != "cpu" and torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={self.local_rank} but only {torch.cuda.device_count()} GPUs are visible")
            torch.cuda.set_device(self.local_rank)

    def init(self, device: torch.device) -> None:
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=dt.timedelta(hours=2))
            log.info("data parallel: rank %d of %d (%s)", self.rank, self.world_size, backend)

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
