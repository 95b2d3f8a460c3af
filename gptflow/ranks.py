"""Which process of a torchrun job this is, read from the variables torchrun sets.

No torch here: the CLI and the stage contract read it before anything heavy is imported. A process started
without torchrun is rank 0 of a world of 1. torchrun sets all of RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; a process with some of them set and others missing was started by hand with a half-copied
environment, and is refused by the name of the first missing variable rather than left to hang at the
rendezvous.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from gptflow.errors import GptflowError

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")  # any of these marks a process as one of a torchrun job
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT")


class DistributedEnvError(GptflowError, ValueError):
    """The torchrun variables of this process are incomplete or inconsistent."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, manifests, logs and artifacts."""
        return self.rank == 0


def process_ranks(environ: Mapping[str, str] | None = None) -> Ranks:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""
    env = os.environ if environ is None else environ
    present = [name for name in RANK_VARIABLES if name in env]
    if not present:
        return Ranks()
    missing = [name for name in (*RANK_VARIABLES, *RENDEZVOUS_VARIABLES) if name not in env]
    if missing:
        raise DistributedEnvError(
            f"{present[0]} is set but {missing[0]} is not: the torchrun variables are half set; start the "
            f"command with torchrun (which sets {', '.join(RANK_VARIABLES + RENDEZVOUS_VARIABLES)}), or unset "
            f"{', '.join(present)}"
        )
    values = {}
    for name in RANK_VARIABLES:
        try:
            values[name] = int(env[name])
        except ValueError:
            raise DistributedEnvError(f"{name}={env[name]!r} is not an integer") from None
    rank, local_rank, world = values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"]
    if world < 1:
        raise DistributedEnvError(f"WORLD_SIZE={world} must be at least 1")
    if not 0 <= rank < world:
        raise DistributedEnvError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if local_rank < 0 or local_rank > rank:
        raise DistributedEnvError(f"LOCAL_RANK={local_rank} must be between 0 and RANK={rank}")
    return Ranks(rank, local_rank, world)
