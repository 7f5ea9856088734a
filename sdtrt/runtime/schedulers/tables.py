"""Per-step coefficient tables and the device-side helpers every ``step`` uses.

A scheduler is split in two (house rule 5): ``make_tables(config, steps)`` does all the schedule arithmetic on the
host in float64, once; ``step(tables, i, x, model_output, history, noise)`` only gathers row ``i`` of its tables and
does a fixed handful of multiply-adds. Nothing in ``step`` reads a tensor value on the host, so the whole denoising
loop can be captured in one CUDA graph with ``i`` a 0-dim int64 device tensor that the graph advances itself.

Warm-up and final-step rules of multistep solvers are rows of the tables (a zero coefficient for history that does
not exist yet, a different order on the last step), not branches. History is one preallocated tensor,
``(history_len, *x.shape)``, written in place: a ring buffer whose slot for step ``i`` is a table entry too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from sdtrt.errors import UsageError

TablesT = TypeVar("TablesT", bound="Tables")

# Tables fields that keep their dtype when the coefficient tables are cast (UNet input is float32 timesteps).
_KEEP_DTYPE = frozenset({"timesteps"})


@dataclass(frozen=True)
class Tables:
    """What the pipeline needs from any scheduler; subclasses add their per-step coefficients.

    ``E = num_evals`` rows: one per UNet evaluation (``steps`` for every scheduler here except PLMS, which
    evaluates the UNet twice on its second step).
    """

    steps: int  # the requested number of inference steps
    num_evals: int  # E: UNet evaluations = calls to step()
    timesteps: torch.Tensor  # (E,) float32: the timestep fed to the UNet at evaluation i
    c_in: torch.Tensor  # (E,) the pipeline feeds the UNet c_in[i] * x (diffusers' scale_model_input)
    init_noise_sigma: float  # the pipeline starts from init_noise_sigma * randn
    history_len: int  # S: leading size of the history tensor (0: no history)
    needs_noise: bool  # step() consumes a fresh standard-normal tensor every evaluation

    def to(self: TablesT, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TablesT:
        """All tensors on ``device``; floating coefficient tables cast to ``dtype`` (timesteps stay float32)."""
        changes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, torch.Tensor):
                continue
            cast = dtype if value.is_floating_point() and field.name not in _KEEP_DTYPE else None
            changes[field.name] = value.to(device=device, dtype=cast)
        return dataclasses.replace(self, **changes)


def at(table: torch.Tensor, i: torch.Tensor | int) -> torch.Tensor:
    """Row ``i`` of a per-step table, without a host sync.

    ``table[i]`` with a 0-dim tensor ``i`` would call ``.item()`` (aten::_local_scalar_dense); ``index_select``
    stays on the device. ``table`` (E, *rest) -> (*rest).
    """
    if isinstance(i, int):
        return table[i]
    return table.index_select(0, i.reshape(1)).squeeze(0)


def write_slot(history: torch.Tensor, slots: torch.Tensor, i: torch.Tensor | int, value: torch.Tensor) -> None:
    """``history[slots[i]] = value`` in place, slot chosen on the device.

    history (S, *x.shape), slots (E,) int64, value (*x.shape).
    """
    history.index_copy_(0, at(slots, i).reshape(1), value.unsqueeze(0))


def combine(coefs: torch.Tensor, history: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """``acc + sum_s coefs[s] * history[s]``: coefs (S,), history (S, *x.shape), acc (*x.shape).

    Unrolled over the static slot count instead of a matmul so the sum is plain elementwise fp arithmetic
    (no TF32/reduced-precision GEMM paths) and needs no scratch of size S * x.
    """
    for s in range(history.shape[0]):
        acc = acc + coefs[s] * history[s]
    return acc


def new_history(tables: Tables, x: torch.Tensor) -> torch.Tensor:
    """The zeroed history buffer for ``tables``: (S, *x.shape) like ``x``.

    Zeros, not ``empty``: warm-up rows give unwritten slots a zero coefficient, and 0 * NaN would still be NaN.
    """
    return torch.zeros((tables.history_len, *x.shape), dtype=x.dtype, device=x.device)


def f64(values: np.ndarray | list[float]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))


def i64(values: np.ndarray | list[int]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))


def timesteps_f32(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def check_finite(scheduler: str, steps: int, **tables: np.ndarray) -> None:
    """Refuse configurations whose coefficients are not finite (diffusers would silently produce NaN)."""
    for name, values in tables.items():
        if not np.all(np.isfinite(values)):
            raise UsageError(
                f"{scheduler}: this scheduler config gives non-finite {name} coefficients at steps={steps} "
                "(e.g. a zero-terminal-SNR schedule with epsilon prediction); choose another spacing or scheduler"
            )
