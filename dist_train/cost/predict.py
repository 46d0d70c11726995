"""The planner's prediction of one layout: memory, step time, tokens/s, MFU, whether it fits.

    pred = predict(cfg, profile)            # cfg: a validated Config (its parallel.* is the layout)
    pred.memory["total"], pred.step_time_s, pred.tokens_per_s, pred.breakdown_lines()
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import Config
from ..plan.profiles import DeviceProfile
from .flops import flops_per_token
from .memory import peak_load, peak_phase, rank_memory
from .shape import cp_execution, rank_inputs
from .step_time import time_model


@dataclass
class Prediction:
    layout: dict
    memory: dict                  # bytes by component + "total" (the step's peak phase, not their sum)
    time: dict                    # seconds per step by component + "step"
    step_time_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float
    exposed_comm_fraction: float
    fits: bool
    device: str
    flops_per_token: float
    memory_phases: dict           # bytes at each phase of the step: memory["total"] is the max
    notes: list = field(default_factory=list)
    # per step, the host's dispatch of the micro-batches' eager ops against the device's compute they overlap
    # (step_time.time_model: ops, dispatch_s, device_s, bound) and the profile's host_op_us; empty where the
    # profile costs no host dispatch (host_op_us 0: the CPU, whose ops run on the host, or a custom profile
    # without the field)
    host: dict = field(default_factory=dict)

    @property
    def host_bound(self) -> bool:
        """This rank's compute waits for the host's launches (the device would finish each micro-batch sooner)."""
        return bool(self.host.get("bound"))

    def to_dict(self) -> dict:
        return {"layout": self.layout, "memory_bytes": self.memory, "time_s": self.time,
                "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "tflops_per_device": self.tflops_per_device, "mfu": self.mfu,
                "exposed_comm_fraction": self.exposed_comm_fraction, "fits": self.fits, "device": self.device,
                "flops_per_token": self.flops_per_token, "memory_phases_bytes": self.memory_phases,
                "notes": self.notes, "host_bound": self.host_bound, "host": self.host}

    def breakdown_lines(self) -> list[str]:
        gib = 2 ** 30
        mem = ", ".join(f"{k} {v / gib:.3g}" for k, v in self.memory.items() if k != "total" and v)
        tim = ", ".join(f"{k} {v * 1e3:.3g}" for k, v in self.time.items() if k != "step" and v)
        phases = ", ".join(f"{k} {v / gib:.3g}" for k, v in self.memory_phases.items())
        lines = [f"memory GiB: total {self.memory['total'] / gib:.3g} (the step's peak) of {mem}",
                 f"memory peak: {peak_phase(self.memory_phases)} (phases GiB: {phases}; the components "
                 "above do not all coexist)",
                 f"time ms/step: total {self.step_time_s * 1e3:.4g} = {tim}"]
        return lines + ([self.host_line()] if self.host else [])

    def host_line(self) -> str:
        """The host's dispatch against the device's compute, per step: host-bound, or hidden behind the kernels."""
        h = self.host
        head = (f"host dispatch: {h['ops']:,.0f} eager ops x {h['host_op_us']:g} us = {h['dispatch_s'] * 1e3:.4g} "
                f"ms/step vs device compute {h['device_s'] * 1e3:.4g} ms")
        if self.host_bound:
            return (f"{head}: HOST-BOUND, the device waits {self.time['host_dispatch_exposed'] * 1e3:.4g} ms/step "
                    "(host_dispatch_exposed)")
        return f"{head}: hidden behind the kernels (host {100 * h['dispatch_s'] / h['device_s']:.3g}% of device)"


def predict(cfg: Config, prof: DeviceProfile, world: Optional[int] = None) -> Prediction:
    """Memory and speed of ``cfg``'s layout on ``prof`` devices (world = dp·tp·pp·cp·wp by default)."""
    world = world or cfg.world_size
    sh, loc = rank_inputs(cfg, prof)
    load = peak_load(cfg, sh, prof, loc)   # the pipeline rank with the largest peak: its memory and its time
    mem, phases = rank_memory(cfg, sh, prof, loc, load)
    tm = time_model(cfg, sh, prof, loc, mem, world, load)
    comm_total = tm.pop("comm_total")
    host = tm.pop("host")
    host = dict(host, host_op_us=prof.host_op_us) if prof.host_op_us > 0 else {}
    step = tm["step"]
    fpt = flops_per_token(sh)
    tokens_step = cfg.train.global_batch * sh.tokens
    tflops = fpt * tokens_step / step / world / 1e12
    p = cfg.parallel
    cpx = cp_execution(cfg)  # the cp that runs (a swin's is Ulysses whatever parallel.cp_method says)
    layout = {"dp": p.dp, "tp": p.tp, "pp": p.pp, "cp": p.cp, "wp": list(cfg.wp_grid),
              "cp_method": cpx.method if p.cp > 1 else p.cp_method, "cp_layout": p.cp_layout,
              "ulysses_degree": cpx.ulysses if p.cp > 1 else p.ulysses_degree, "zero_stage": p.zero_stage,
              "fsdp": p.fsdp, "checkpointing": cfg.train.activation_checkpointing, "micro_batch": cfg.train.micro_batch,
              "sequence_parallel": p.sequence_parallel}
    return Prediction(layout=layout, memory=mem, time=tm, step_time_s=step, tokens_per_s=tokens_step / step,
                      tflops_per_device=tflops, mfu=tflops / prof.peak_tflops,
                      exposed_comm_fraction=comm_total / step, fits=mem["total"] <= prof.memory_bytes,
                      device=prof.name, flops_per_token=fpt, memory_phases=phases, host=host)
