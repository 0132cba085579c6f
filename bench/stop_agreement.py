"""What the per-step stop agreement costs: StopSignals.agreed() (one int through a gloo all-reduce)
between N local processes, in microseconds per call. The training loop calls it once per optimizer
step under several processes.

    python bench/stop_agreement.py --processes 2 --calls 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import textual_inversion as ti


def worker(rank: int, world: int, calls: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stop = ti.StopSignals()
    stop.agreed(world)  # creates the group
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        stop.agreed(world)
        times.append(time.perf_counter() - start)
    if rank == 0:
        results.put(times)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--port", type=int, default=29517)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, (args.processes, args.calls, args.port, results), nprocs=args.processes)
    times = sorted(results.get())
    micro = [t * 1e6 for t in times]
    print(
        f"{args.processes} processes, {args.calls} calls: median {statistics.median(micro):.0f} us, "
        f"p90 {micro[int(0.9 * len(micro))]:.0f} us, mean {statistics.fmean(micro):.0f} us per call"
    )


if __name__ == "__main__":
    main()
