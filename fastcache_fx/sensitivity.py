"""The final sample's sensitivity to the model output at each step of a sampler (issue 37).

Every common diffusers scheduler step is linear in (sample, model output) with scalar
coefficients: DDIM, DPM-Solver++ (multistep, its history included), UniPC (predictor and
corrector), Euler and flow-matching Euler. So the final sample is x_0 = a x_T + sum_k s_k O_k,
and s_k, the change of the final sample per unit change of the model output O_k at step k when
the model's own feedback is ignored (the later model outputs held fixed), can be read off the
scheduler exactly: run the whole chain once on a vector of N elements (N = the number of steps)
with x_T = 0 and, at step k, the model output onehot(k); element k of the result is s_k.

This is the coefficient the output budget's per-step weight uses (``runtime.quality``): an
output error e_k at step k moves the final sample by about |s_k| e_k.
"""

from __future__ import annotations

import copy

import torch


def output_sensitivity(scheduler) -> torch.Tensor:
    """s_k for every step of ``scheduler``'s current timesteps: [N] float64.

    ``scheduler``: a diffusers scheduler after ``set_timesteps`` (it is deep-copied, not changed;
    a copy taken mid-trajectory is reset to the first step). Raises ValueError when
    ``set_timesteps`` was not called (no ``timesteps``). Stochastic schedulers (DDPM, ancestral Euler) are not linear in the
    model output alone: their noise term is left out by using x_T = 0 and a fixed generator."""
    ts = getattr(scheduler, "timesteps", None)
    if ts is None or len(ts) == 0:
        raise ValueError("scheduler: call set_timesteps before reading its sensitivity (no timesteps)")
    sched = _at_first_step(copy.deepcopy(scheduler))
    n = len(sched.timesteps)
    # float32: several schedulers compute in float32 and would mix dtypes with float64 samples
    x = torch.zeros(n, 1, 1, 1)
    eye = torch.eye(n).reshape(n, n, 1, 1, 1)
    for k, t in enumerate(sched.timesteps):
        if hasattr(sched, "scale_model_input"):
            sched.scale_model_input(x, t)  # Euler warns without it; its result is the model's input only
        kw = {}
        if "generator" in _step_params(sched):
            kw["generator"] = torch.Generator().manual_seed(0)
        x = sched.step(eye[k], t, x, return_dict=False, **kw)[0]
    return x.flatten().double()


#: a scheduler's per-trajectory state and its value before the first step (diffusers' DDIM,
#: DPM-Solver++, UniPC, DEIS, Euler, Heun, flow-matching Euler: ``set_timesteps`` resets these)
_TRAJECTORY_STATE = {"_step_index": None, "_begin_index": None, "lower_order_nums": 0, "last_sample": None,
                     "prev_derivative": None, "dt": None, "sample": None}
_HISTORIES = ("model_outputs", "timestep_list")


def _at_first_step(sched):
    """``sched`` (a copy) back at its first step: a scheduler read mid-trajectory (Wan 2.2's second
    expert is first called after the first expert's steps) keeps its schedule but not its history."""
    for name, value in _TRAJECTORY_STATE.items():
        if name in sched.__dict__:
            setattr(sched, name, value)
    for name in _HISTORIES:
        if isinstance(sched.__dict__.get(name), list):
            setattr(sched, name, [None] * len(sched.__dict__[name]))
    return sched


def _step_params(sched) -> set[str]:
    import inspect

    return set(inspect.signature(sched.step).parameters)


def step_index(timesteps: torch.Tensor, timestep) -> int:
    """The index of the step whose timestep is nearest ``timestep`` (a number or a tensor whose
    first element is the step's timestep, as a pipeline passes it to the transformer)."""
    t = float(torch.as_tensor(timestep).flatten()[0]) if not isinstance(timestep, (int, float)) else float(timestep)
    return int((timesteps.double() - t).abs().argmin())
