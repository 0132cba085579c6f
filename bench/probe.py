"""Run a training script in this process and record what bench.py measures.

    python bench/probe.py RECORD.json SCRIPT [script flags ...]

Records, without changing the script: the time of every real optimizer step (a global
torch.optim post-step hook, so gradient-accumulation micro-steps that do not step are not
counted), every `Accelerator.log` call (the losses), the peak resident memory, the input shape
of every training UNet call and, on CUDA, the peak allocated memory. Times are seconds since this process started
(`start_epoch` is that moment on the wall clock, so a parent can time from its own launch); `end`
is taken at exit after a torch.cuda.synchronize(), so it counts every kernel the run queued.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import resource
import runpy
import sys
import time

START = time.perf_counter()
START_EPOCH = time.time()


def main() -> None:
    record_path, script, *argv = sys.argv[1:]
    import accelerate
    import torch

    steps: list[float] = []
    logs: list[dict] = []
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *_: steps.append(time.perf_counter() - START))

    log = accelerate.Accelerator.log

    def recording_log(self, values: dict, step: int | None = None, log_kwargs: dict | None = None):
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        logs.append({"time": time.perf_counter() - START, "step": step, **numbers})
        return log(self, values, step=step, log_kwargs=log_kwargs or {})

    accelerate.Accelerator.log = recording_log

    # UNet calls that train (validation runs without grad), to count calls per optimizer step.
    from diffusers import UNet2DConditionModel

    unet_calls: list[list[int]] = []
    forward = UNet2DConditionModel.forward

    def counting_forward(self, sample, *args, **kwargs):
        # Not while torch.compile traces: a list mutated inside a graph becomes a guard on its
        # length, and every later call would recompile (--compile runs record no calls).
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            unet_calls.append(list(sample.shape))
        return forward(self, sample, *args, **kwargs)

    UNet2DConditionModel.forward = counting_forward

    def dump() -> None:
        cuda_peak = None
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
            cuda_peak = torch.cuda.max_memory_allocated()
        record = {
            "start_epoch": START_EPOCH,
            "steps": steps,
            "logs": logs,
            "unet_calls": unet_calls,
            "end": time.perf_counter() - START,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cuda_peak_allocated_bytes": cuda_peak,
        }
        with open(record_path, "w") as f:
            json.dump(record, f)

    atexit.register(dump)
    # PROBE_IMPORTS (comma-separated modules): a one-time import the script makes mid-run (this
    # trainer's first loss.png) then lands in start-up, alike for a short and a long run.
    for name in filter(None, os.environ.get("PROBE_IMPORTS", "").split(",")):
        importlib.import_module(name)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
