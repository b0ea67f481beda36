"""Several processes of one run (``torchrun``, ``accelerate launch``): which process this is, a barrier, and
work split across the processes and gathered back in order. Imports nothing of the package.

Every process runs the same dataflow, node for node, so that their collective operations (the Trainer's
DDP all-reduces, the gathers here) meet. With one process (``WORLD_SIZE`` unset or 1) nothing is
initialised: every helper answers as the only process, at no cost.
"""

import os
from typing import Callable, Optional, Sequence

#: The environment variable torchrun and accelerate set to the number of processes of the run.
WORLD_SIZE_ENV = "WORLD_SIZE"
#: ... and to this process's rank on its machine.
LOCAL_RANK_ENV = "LOCAL_RANK"
#: ... and to this process's rank in the whole run (0: the main process).
RANK_ENV = "RANK"


def launched_processes() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 when unset or not a number), read
    from the environment only: no process group is created."""
    try:
        return max(1, int(os.environ.get(WORLD_SIZE_ENV, "1")))
    except ValueError:
        return 1


def launched_local_rank() -> int:
    """This process's rank on its own machine (``LOCAL_RANK``, the GPU it uses; 0 when unset), read from
    the environment only."""
    try:
        return max(0, int(os.environ.get(LOCAL_RANK_ENV, "0")))
    except ValueError:
        return 0


def launched_rank() -> int:
    """This process's rank in the run (``RANK``; 0 when unset), read from the environment only: usable where
    no process group may be created, e.g. in a signal handler."""
    try:
        return max(0, int(os.environ.get(RANK_ENV, "0")))
    except ValueError:
        return 0


def process_state():
    """accelerate's ``PartialState`` of this process (shared: created once, with the process group of
    the launcher's environment, gloo on a CPU, NCCL on CUDA), or None with one process
    (``launched_processes() == 1``), where none is created.

    Without CUDA it is asked for the CPU (``cpu=True``): otherwise accelerate takes a CPU-only launch for a
    single process. The Trainer's arguments later make it afresh with the same settings (``TrainingArguments``
    ``use_cpu`` is set where there is no CUDA).
    """
    if launched_processes() <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def num_processes() -> int:
    """Processes of the run (1 without a launcher)."""
    state = process_state()
    return 1 if state is None else state.num_processes


def is_main_process() -> bool:
    """Whether this is the process that writes the run's files and prints (global rank 0); True with one
    process."""
    state = process_state()
    return state is None or state.is_main_process


def wait_for_everyone() -> None:
    """A barrier: returns once every process has called it; a no-op with one process."""
    state = process_state()
    if state is not None:
        state.wait_for_everyone()


def largest_of_every_process(value: int, device) -> int:
    """The largest ``value`` any process of the run holds (an all-reduce with ``MAX`` over the default
    process group, on ``device``: the CPU for gloo, the process's GPU for NCCL); ``value`` itself where no
    process group of several processes is initialised. Every process must call it at the same point (it is
    a collective operation)."""
    import torch
    import torch.distributed

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def in_original_order(per_rank: Sequence[Sequence], total: int) -> list:
    """The results of ``sharded_map``'s shards put back in item order: ``per_rank[r][k]`` is the result of
    item ``r + k * len(per_rank)``.

    :param per_rank: one list of results per process, in rank order.
    :param total: the number of items.
    :raises ValueError: the shards do not hold ``total`` results between them, strided by rank.
    """
    world = len(per_rank)
    expected = [len(range(rank, total, world)) for rank in range(world)]
    if [len(results) for results in per_rank] != expected:
        raise ValueError(f"sharded results of {[len(r) for r in per_rank]} items per process do not cover "
                         f"{total} items strided over {world} processes ({expected} expected).")
    ordered: list = [None] * total
    for rank, results in enumerate(per_rank):
        ordered[rank::world] = list(results)
    return ordered


def sharded_map(items: Sequence, fn: Callable[[list], list], state: Optional[object] = None) -> list:
    """``fn(items)``, computed in shares: process ``r`` of ``w`` runs ``fn`` on ``items[r::w]``, the
    results are gathered (``torch.distributed.all_gather_object``: they must pickle) and every process gets
    all of them in the order of ``items``. With one process, ``fn(list(items))``.

    Every process must call it, with the same items, at the same point of the run (it is a collective
    operation).

    :param fn: maps a list of items to a list of as many results, each depending on its item only.
    :param state: the ``PartialState`` to use (default ``process_state()``).
    :return: one result per item, in the order of ``items``.
    :raises ValueError: ``fn`` returned a list of another length than its shard.
    """
    state = process_state() if state is None else state
    world = 1 if state is None else state.num_processes
    if world == 1:
        return list(fn(list(items)))
    import torch.distributed

    shard = list(items[state.process_index::world])
    results = list(fn(shard))
    if len(results) != len(shard):
        raise ValueError(f"sharded_map: fn returned {len(results)} results for {len(shard)} items.")
    per_rank: list = [None] * world
    torch.distributed.all_gather_object(per_rank, results)
    return in_original_order(per_rank, len(items))
