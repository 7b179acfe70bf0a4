"""One process or several (accelerate / torchrun): split the prompts, sum the counts."""
from __future__ import annotations

import os

import torch

from headscope.errors import HeadscopeError


class Processes:
    """One process, or the processes of `accelerate launch` (PartialState; sum over gloo/NCCL)."""

    def __enter__(self) -> "Processes":
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            try:
                from accelerate import PartialState
            except ImportError:
                raise HeadscopeError("WORLD_SIZE > 1 but accelerate is not installed; "
                                     "pip install 'headscope[accelerate]'") from None
            # `accelerate launch --cpu`, or a machine without CUDA: processes on CPU, summed over gloo.
            cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") \
                or not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    @property
    def device(self) -> str | None:
        """This process's device under accelerate (e.g. cuda:1); None in a single process."""
        return str(self.state.device) if self.state else None

    @property
    def rank(self) -> int:
        return self.state.process_index if self.state else 0

    @property
    def world(self) -> int:
        return self.state.num_processes if self.state else 1

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process if self.state else True

    def split(self, items: list) -> list:
        if self.state is None:
            return items
        with self.state.split_between_processes(items) as mine:
            return list(mine)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of every process's tensor (every process gets the result)."""
        if self.state is None:
            return tensor.clone()
        from accelerate.utils import reduce

        self.state.wait_for_everyone()
        return reduce(tensor.to(self.state.device), reduction="sum").cpu()
