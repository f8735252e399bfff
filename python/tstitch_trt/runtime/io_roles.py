"""Step-graph I/O by ROLE: how every backend binds a step graph without knowing its names.

A step graph's tensors fall into three roles (recorded in the manifest's io["roles"]):

- state:   (input, output) pairs carried from step to step in ping-pong slots. Step i reads the
           input from slot i % 2 and writes the output to slot (i + 1) % 2. The FIRST pair is the
           latent (x -> x_next): slot 0 of its input starts as the initial latent; every other
           state starts at zero. DiT: x, prev_x0 <- x0. SD: + eps_hist, saved.
- step:    per-step rows of tables uploaded once per trajectory (t, coef, noise), taken from the
           TrajectoryPlan: t <- plan.timesteps, coef <- plan.coef, noise <- plan.noise (zero rows
           where the sampler draws none).
- request: per-request constants. The conditioning (DiT: y (B,); SD: context (2B, 77, D), uncond
           first) and guidance ().
- cache:   the kept feature of feature caching, one (input, output) pair: DeepCache's U-Net feature
           (export/deep_cache.py) or FORA's attention and MLP outputs of every DiT block in one tensor
           (export/fora.py). Each model has ONE buffer of its own shape (models[i].cached.feature), not
           ping-ponged, kept across calls.
           The model's full graph writes it (output), its cached graph reads it (input); a cached call
           always follows a full call of the same model (sampling/cache_plan.py).

Shapes come from io["inputs"] / io["outputs"]: "B" is the batch, other names (SD: "H", "W") take
their value from the initial latent's shape, and a name with a number in front is that multiple
("2B": the CFG-doubled batch; "8H", "8W": a ControlNet image at the VAE's pixel size), and a name
over a number is that fraction ("H/2": a kept feature one level down; the latent's H must divide). Bundles written
before roles existed (the shipped demo pair) are DiT bundles and get DIT_ROLES.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tstitch_trt.errors import UserError

DIT_ROLES = {
    "state": [["x", "x_next"], ["prev_x0", "x0"]],
    "step": ["t", "coef", "noise"],
    "request": ["y", "guidance"],
}
PLAN_FIELDS = {"t": "timesteps", "coef": "coef", "noise": "noise"}  # step role -> TrajectoryPlan field
# other step inputs (a ControlNet's control_scale) come from TrajectoryPlan.tables by name


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int | str, ...]  # ints, or symbolic dims: "B" (batch), "2B", "H", "W"
    dtype: np.dtype

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(resolve_dim(d, dims) if isinstance(d, str) else int(d) for d in self.shape)


def resolve_dim(symbol: str, dims: Mapping[str, int]) -> int:
    """The value of a symbolic dim: a name from `dims`, or a multiple of one ("2B", "8H")."""
    if symbol in dims:
        return int(dims[symbol])
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)/([1-9][0-9]*)", symbol)
    if m is not None and m.group(1) in dims:
        value, f = int(dims[m.group(1)]), int(m.group(2))
        if value % f:
            raise UserError(f"the latent's {m.group(1)} = {value} is not a multiple of {f}, which the step graphs "
                            "need; choose another size")
        return value // f
    m = re.fullmatch(r"([1-9][0-9]*)([A-Za-z_][A-Za-z0-9_]*)", symbol)
    if m is None or m.group(2) not in dims:
        raise UserError(f"the bundle manifest's io uses the dim {symbol!r}, which no latent dim defines; rebuild "
                        "the bundle")
    return int(m.group(1)) * int(dims[m.group(2)])


@dataclass(frozen=True)
class StepIO:
    state: tuple[tuple[str, str], ...]
    step: tuple[str, ...]
    request: tuple[str, ...]
    specs: Mapping[str, TensorSpec]
    cache: tuple[str, str] | None = None  # (cached graphs' input, full graphs' output) of the kept feature
    features: tuple[TensorSpec, ...] = ()  # the kept feature of each model (its own shape)

    @classmethod
    def from_io(cls, io: Mapping[str, Any], features: list[Mapping[str, Any]] | None = None) -> StepIO:
        """features: each model's kept feature spec (manifest models[i].cached.feature), bound by io.roles.cache."""
        roles = io.get("roles") or DIT_ROLES
        specs = {name: TensorSpec(tuple(s["shape"]), np.dtype(s["dtype"]))
                 for part in ("inputs", "outputs") for name, s in io.get(part, {}).items()}
        # the cache role binds only where the models' features are given (step_io): a reader that runs the full
        # graphs alone (check, bench) sees the step I/O without it
        cache = tuple(roles["cache"][0]) if roles.get("cache") and features else None
        feats = tuple(TensorSpec(tuple(f["shape"]), np.dtype(f["dtype"])) for f in features or []) if cache else ()
        out = cls(tuple((a, b) for a, b in roles["state"]), tuple(roles["step"]), tuple(roles["request"]), specs,
                  cache, feats)  # type: ignore[arg-type]
        missing = [n for n in out.names if n not in specs]
        if missing:
            raise UserError(f"the bundle manifest's io has no shape for {', '.join(missing)}; rebuild the bundle")
        return out

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.state) + self.step + self.request

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(b for _, b in self.state)

    @property
    def names(self) -> tuple[str, ...]:
        return self.inputs + self.outputs

    @property
    def latent(self) -> str:
        return self.state[0][0]

    @property
    def cond(self) -> str:
        """The conditioning input: the first request tensor that is not guidance."""
        return next(n for n in self.request if n != "guidance")

    def dims(self, latent_shape: tuple[int, ...]) -> dict[str, int]:
        """Symbolic dims from the initial latent's shape (B, C, H, W); a fixed dim that differs is refused."""
        spec = self.specs[self.latent].shape
        if len(spec) != len(latent_shape):
            raise UserError(f"the latent has shape {tuple(latent_shape)}, the step graphs take {list(spec)}")
        dims: dict[str, int] = {}
        for d, n in zip(spec, latent_shape, strict=True):
            if isinstance(d, str):
                dims[d] = int(n)
            elif int(d) != int(n):
                raise UserError(f"the latent has shape {tuple(latent_shape)}, the step graphs take {list(spec)}")
        dims["2B"] = 2 * dims["B"]
        return dims

    def shape(self, name: str, dims: Mapping[str, int]) -> tuple[int, ...]:
        return self.specs[name].resolve(dims)

    def dtype(self, name: str) -> np.dtype:
        return self.specs[name].dtype

    def output_of(self, state_input: str) -> str:
        return dict(self.state)[state_input]

    def request_arrays(self, cond: np.ndarray | Mapping[str, np.ndarray], guidance: float) -> dict[str, np.ndarray]:
        """The request tensors, cast to their dtypes: `cond` is the conditioning array, or a dict by name."""
        given = dict(cond) if isinstance(cond, Mapping) else {self.cond: cond}
        given.setdefault("guidance", np.asarray(guidance, dtype=np.float32))
        missing = [n for n in self.request if n not in given]
        if missing:
            raise UserError(f"the step graphs need {', '.join(missing)} for this request")
        # np.array, not ascontiguousarray: that turns the 0-d guidance into shape (1,)
        return {n: np.array(given[n], dtype=self.dtype(n), order="C") for n in self.request}

    def step_tables(self, plan: Any, dims: Mapping[str, int]) -> dict[str, np.ndarray | None]:
        """(steps, *row shape) arrays per step role; None for noise where the sampler draws none."""
        out: dict[str, np.ndarray | None] = {}
        for name in self.step:
            if name in PLAN_FIELDS:
                value = getattr(plan, PLAN_FIELDS[name])
            else:
                value = (getattr(plan, "tables", None) or {}).get(name)
                if value is None:
                    raise UserError(f"the step graphs take the per-step input {name!r}, which this request does "
                                    "not give")
            if value is None:
                out[name] = None
                continue
            row = self.shape(name, dims)
            value = np.asarray(value)
            if name == "t":  # one timestep per step, repeated over the batch
                value = np.repeat(value[:, None], dims["B"], axis=1)
            out[name] = np.ascontiguousarray(value.astype(self.dtype(name)).reshape(plan.steps, *row))
        return out


def step_io(manifest: Any) -> StepIO:
    """The bundle's StepIO, with each model's kept feature where it has DeepCache's cached graphs."""
    feats = [m.cached["feature"] for m in manifest.models if m.cached] or None
    return StepIO.from_io(manifest.io, feats)


def graph_io(io: Mapping[str, Any], step: StepIO, model: int, cached: bool) -> dict[str, Any]:
    """The manifest io of one graph: the bundle's, plus the kept feature's output (a full graph of a bundle
    with caching) or input (a cached graph), in the model's own shape."""
    if step.cache is None:
        return dict(io)
    f = step.features[model]
    part, name = ("inputs", step.cache[0]) if cached else ("outputs", step.cache[1])
    spec = {"shape": list(f.shape), "dtype": f.dtype.name}
    return {**io, part: {**io.get(part, {}), name: spec}}


def state_slots(step: int) -> tuple[int, int]:
    """(slot the state inputs are read from, slot the state outputs are written to) at `step`."""
    return step % 2, (step + 1) % 2
