"""Regional compilation: one compiled graph per block class, one cache state per block instance.

``transformer.compile_repeated_blocks(backend="fastcache")`` (diffusers) or
``enable_fastcache(model, regional=True)`` compiles each block class once; Dynamo then calls
that graph for every block of the class with the block's own parameters as inputs. The backend
wraps the whole block graph in the guarded cond (``passes.blocks.find_block_graph``,
``apply_block_cache(clock="input")``); this module runs it:

- ``BlockRuntime``: the callable of one block graph. It finds the instance it is called for from
  the identity of the parameter tensors it receives, and keeps that instance's state (anchors,
  counter) per (request, CFG context) (``runtime.requests``) in the model's ``RegionalModel``: two
  blocks, or two concurrent requests, never share state.
- ``RegionalModel``: everything one model shares across its block graphs: the ``StepClock``, the
  per-instance states, the per-step decision rows that ``stats()`` reads, block names.
- ``StepClock``: step and trajectory bookkeeping. The block graph has no timestep input, so
  ``enable_fastcache(..., regional=True)`` installs a forward pre-hook on the transformer that
  reads its ``timestep`` argument: a new trajectory starts when it repeats or turns back (the
  whole-graph rule, ``ops.decision.starts_trajectory``) and t feeds ``adaptive_beta`` / time
  buckets. Without the hook (a bare ``compile_repeated_blocks``), steps are counted from the
  blocks' call order (a step starts when a block that already ran in this step runs again), t is
  0, and only ``reset()`` starts a new trajectory.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from ..passes.blocks import is_param
from ..ops import decision as D
from . import registry
from .context import current_context
from .records import StepRecord, TraceLog
from .requests import current_request, end_finished


class _Tick:
    __slots__ = ("step", "t", "prev_t", "t_first", "seen", "row", "evicted")

    def __init__(self) -> None:
        self.step, self.t, self.prev_t, self.t_first = -1, 0.0, float("-inf"), float("nan")
        self.seen: set[str] = set()
        self.row: dict[str, tuple] = {}
        self.evicted = False  # this step started afresh after the live-request bound dropped the state


def state_key() -> tuple[str, str]:
    """(request id, CFG context) of the running call: the key of every per-trajectory state."""
    return current_request().id, current_context()


class StepClock:
    """Steps of one model per (request, CFG context) (see the module docstring).

    ``hooked`` is True once the transformer's forward drives it (``begin_step``)."""

    def __init__(self) -> None:
        self.hooked = False
        self.ticks: dict[tuple[str, str], _Tick] = {}

    def _tick(self, ctx: tuple[str, str]) -> _Tick:
        return self.ticks.setdefault(ctx, _Tick())

    def begin_step(self, timestep) -> tuple[tuple[str, str], _Tick]:
        """A forward of the transformer starts (called by the pre-hook): advance the step, or
        start a trajectory when the timestep repeats or turns back against the trajectory's
        direction (``ops.decision.starts_trajectory``; first element; None: advance)."""
        self.hooked = True
        ctx = state_key()
        c = self._tick(ctx)
        t = None if timestep is None else float(torch.as_tensor(timestep).reshape(-1)[0])
        # prev_t is -inf while only on_block counted steps (the driver came later): go on counting
        new_traj = c.step < 0 or (t is not None and c.prev_t != float("-inf")
                                  and D.starts_trajectory(t, c.prev_t, c.step, c.t_first))
        c.step = 0 if new_traj else c.step + 1
        if new_traj and t is not None:
            c.t_first = t
        c.t = 0.0 if t is None else t
        c.prev_t = c.t if t is not None else c.prev_t
        c.seen.clear()
        return ctx, c

    def drive(self, timestep) -> tuple[tuple[str, str], _Tick, bool]:
        """A graph of a model split by graph breaks saw the model's timestep: begin a step unless
        this step already began (another graph of the same call saw the same timestep).
        Returns ((request, context), its tick, whether a step began)."""
        key = state_key()
        c = self._tick(key)
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        if self.hooked and c.step >= 0 and t == c.t:
            return key, c, False
        ctx, c = self.begin_step(timestep)
        return ctx, c, True

    def on_block(self, name: str) -> tuple[tuple[str, str], _Tick, bool]:
        """Block ``name`` runs: ((request, context), its tick, whether a new step began with this
        call; never with the hook, which starts steps itself)."""
        ctx = state_key()
        c = self._tick(ctx)
        new = False
        if not self.hooked and (c.step < 0 or name in c.seen):  # call order: a repeat starts a step
            c.step += 1
            c.seen.clear()
            new = True
        c.seen.add(name)
        return ctx, c, new

    def reset(self) -> None:
        self.ticks.clear()


class RegionalModel:
    """What the block graphs of one model share; registered in the model's entry as one
    "graph" for ``stats()`` (kind "regional").

    Attributes:
        names: {id of a parameter: block name}, filled by ``enable_fastcache(regional=True)``
            (``register_blocks``) or, for unregistered blocks, ``"<Class>.<i>"`` in call order.
        blocks: block names in the order they ran first.
    """

    kind = "regional"
    fallback = None

    def __init__(self, entry: registry.ModelEntry, config) -> None:
        self.entry = entry
        self.clock = StepClock()
        self.hook_installed = False  # enable_fastcache(regional=True)'s pre-hook drives the clock
        self.names: dict[int, tuple[weakref.ref, str]] = {}
        self.blocks: list[str] = []
        # (block name, (request id, context)) -> (graph, shape key, state)
        self.states: dict[tuple[str, tuple[str, str]], tuple[object, tuple, list[torch.Tensor]]] = {}
        self.online: dict[str, object] = {}
        self.weights: dict[str, dict[str, torch.Tensor]] = {}
        self.done = TraceLog(config.trace_steps, config.trace_requests)
        self.force: dict[tuple[str, str], torch.Tensor | None] = {}
        entry.requests.configure(config.max_live_requests, config.trace_requests)
        self.graphs: list["BlockRuntime"] = []
        self.calls = 0
        entry.graphs.append(self)

    @property
    def dynamic(self) -> bool:
        return any(g.binder is not None for g in self.graphs)

    @property
    def notes(self) -> list[str]:
        """Why block graphs of this model are served otherwise than asked (``backend.plan``)."""
        return list(dict.fromkeys(g.note for g in self.graphs if g.note))

    # names ------------------------------------------------------------------------------
    def register_blocks(self, blocks: dict[str, torch.nn.Module]) -> None:
        """Name the block instances ({name: module}) and register their parameters."""
        for name, mod in blocks.items():
            for p in mod.parameters():
                self.names[id(p)] = (weakref.ref(p), name)
            if name not in self.blocks:
                self.blocks.append(name)

    def name_of(self, param: torch.Tensor, cls: str) -> str:
        hit = self.names.get(id(param))
        if hit is not None and hit[0]() is param:
            return hit[1]
        name = f"{cls}.{sum(1 for b in self.blocks if b.startswith(cls + '.'))}"
        self.names[id(param)] = (weakref.ref(param), name)
        self.blocks.append(name)
        return name

    # state ------------------------------------------------------------------------------
    def state_for(self, name: str, ctx: tuple[str, str], graph, key: tuple) -> list[torch.Tensor]:
        """The state of block ``name`` for (request, context) ``ctx``, fresh when it was built by another graph or
        for another shape (a shape, dtype or device change never reuses it)."""
        hit = self.states.get((name, ctx))
        if hit is not None and hit[0] is graph and hit[1] == key:
            return hit[2]
        st = graph.layout.contract.initial_state(graph.device, lambda s: graph.shape(s, key))
        self.states[(name, ctx)] = (graph, key, st)
        return st

    def drop_state(self) -> None:
        for ctx, tick in self.clock.ticks.items():  # the open rows stay in the statistics
            self._flush(ctx, tick)
        self.states.clear()
        self.clock.reset()
        self.force.clear()

    def drop_request(self, request: str, context: str | None = None) -> None:
        """Forget the states and steps of ``request`` (an id): of its ``context``, or all of them."""
        hit = lambda k: k[0] == request and (context is None or k[1] == context)  # noqa: E731
        for k in [k for k in list(self.clock.ticks) if hit(k)]:
            self._flush(k, self.clock.ticks.pop(k))
            self.force.pop(k, None)
        for k in [k for k in list(self.states) if hit(k[1])]:
            self.states.pop(k, None)

    def reset(self) -> None:
        """Forget states, steps and statistics (the next call starts a trajectory)."""
        self.drop_state()
        self.done.clear()
        self.calls = 0

    def state_bytes(self, request: str | None = None) -> dict[str, int]:
        """Bytes of live state per block instance (of one request id if given)."""
        out: dict[str, int] = {}
        for (name, (rid, _)), (_, _, st) in list(self.states.items()):
            if request is not None and rid != request:
                continue
            out[name] = out.get(name, 0) + sum(t.numel() * t.element_size() for t in st)
        return out

    # decisions ---------------------------------------------------------------------------
    def new_step(self, ctx: tuple[str, str], tick: _Tick) -> None:
        """Close the previous row of ``ctx`` and take this step's replay row, if any."""
        self._flush(ctx, tick)
        self.calls += 1
        replay = self.entry.replay
        self.force[ctx] = replay.next_row(max(1, len(self.blocks))) if replay is not None else None

    def record(self, tick: _Tick, name: str, step: int, delta, thr, ok) -> None:
        tick.row[name] = (step, delta, thr, ok)

    def _flush(self, ctx: tuple[str, str], tick: _Tick) -> None:
        rec = self._row_record(ctx, tick)
        if rec is not None:
            self.done.append(rec)
        tick.row = {}
        tick.evicted = False

    def _row_record(self, ctx: tuple[str, str], tick: _Tick) -> StepRecord | None:
        if not tick.row:
            return None
        rows = [tick.row.get(b) for b in self.blocks]
        nan = torch.full((1,), float("nan"))
        step = next(r[0] for r in rows if r is not None)
        pick = lambda i, fill: torch.cat([r[i].reshape(1).cpu() if r is not None else fill for r in rows])  # noqa: E731
        return StepRecord(ctx[1], torch.tensor(step), pick(1, nan), pick(2, nan), pick(3, torch.zeros(1, dtype=torch.bool)),
                          request=ctx[0], evicted=tick.evicted)

    @property
    def trace(self) -> list[StepRecord]:
        """Closed rows, then the open row of each context."""
        open_rows = [r for ctx, c in list(self.clock.ticks.items()) if (r := self._row_record(ctx, c)) is not None]
        return list(self.done) + open_rows


class BlockRuntime:
    """The callable of one compiled block graph, for every block instance of its class.

    Args:
        b: the pipeline's Build (``backend.Build``) after lowering: layout, compiled graph,
            example inputs, config.
        binder: the ShapeBinder of a dynamic-shape graph, else None.
    """

    def __init__(self, b, binder) -> None:
        self.layout = b.layout
        self.compiled = b.compiled
        self.config = b.config
        self.device = b.device
        self.binder = binder
        self.cls = b.regions[0].name
        self.module_type = b.regions[0].module_type
        phs = [p for p in b.gm.graph.nodes if p.op == "placeholder"][:len(b.example_inputs)]
        self.param_at = next(i for i, (p, x) in enumerate(zip(phs, b.example_inputs))
                             if isinstance(x, torch.Tensor) and is_param(p))
        self.kind = b.approximation
        self.note = b.note  # served otherwise than asked (backend.plan), for stats()["notes"]
        self._q: dict[tuple, torch.Tensor] = {}
        self._models: dict[int, tuple[weakref.ref, RegionalModel]] = {}

    def shape(self, shape, key: tuple) -> tuple[int, ...]:
        return tuple(shape) if self.binder is None else self.binder.evaluate(shape, key)

    def _model(self, param: torch.Tensor) -> RegionalModel:
        hit = self._models.get(id(param))
        if hit is not None and hit[0]() is param:
            return hit[1]
        entry = registry.entry_of_param(param) or registry.entry_for_params([param], default=registry.SHARED_REGIONAL)
        model = entry.regional
        if model is None:
            model = entry.regional = RegionalModel(entry, self.config)
        if self not in model.graphs:
            model.graphs.append(self)
            module = entry.module() if entry.module is not None else None
            if module is not None:  # block graphs Dynamo split off a bare torch.compile: the model's names
                from ..passes.blocks import block_lists

                model.register_blocks({f"{lst}.{i}": m for lst, ml in block_lists(module) for i, m in enumerate(ml)
                                       if type(m).__name__ == self.module_type})
        self._models[id(param)] = (weakref.ref(param), model)
        return model

    def _weights(self, model: RegionalModel, name: str) -> dict[str, torch.Tensor]:
        w = model.weights.get(name)
        if w is None:
            w = model.weights[name] = self._load_weights(model, name)
        return w

    def _load_weights(self, model: RegionalModel, name: str) -> dict[str, torch.Tensor]:
        """This instance's calibrated maps under the graph's weight-input names."""
        if not self.layout.weights:
            return {}
        if self.layout.online:
            from .online import OnlineCalibration

            oc = model.online[name] = OnlineCalibration(self.layout, self.config, self.device)
            return oc.initial_weights(self.device)
        from types import SimpleNamespace

        shapes = [tuple(int(d.node.hint) if isinstance(d, torch.SymInt) else d for d in s)
                  for s in self.layout.stream_shapes[0]]
        got = self.kind.weights(self.config, [SimpleNamespace(name=name, stream_shapes=shapes)])
        return {self.cls + k[len(name):]: v.to(self.device) for k, v in got.items()}

    def _q_ratio(self, key: tuple) -> torch.Tensor:
        q = self._q.get(key)
        if q is None:
            nd = self.binder.evaluate(self.layout.dofs, key)[0]
            q = self._q[key] = torch.tensor([D.chi2_quantile_ratio(self.config.significance_level, nd)],
                                            dtype=torch.float32, device=self.device)
        return q

    def __call__(self, *args):
        param = args[self.param_at]
        registry.count_cached_call()
        end_finished()
        req, cfg = current_request(), current_context()
        model = self._model(param)
        live = model.entry.requests
        with live.lock:
            evicted = live.admit(req, cfg)
            name = model.name_of(param, self.cls)
            ctx, tick, new = model.clock.on_block(name)
            if new:
                model.new_step(ctx, tick)
            tick.evicted |= evicted
            key = self.binder.key(args) if self.binder is not None else ()
            state = model.state_for(name, ctx, self, key)
            force = model.force.get(ctx)
            col = model.blocks.index(name)
            controls = {"step": torch.tensor(tick.step, dtype=torch.int64, device=self.device),
                        "t": torch.tensor(tick.t, dtype=torch.float32, device=self.device),
                        "force": (force[col:col + 1] if force is not None and col < len(force)
                                  else torch.full((1,), -1, dtype=torch.int8)).to(self.device)}
            for c in self.layout.contract.controls:  # the output budget's weight / offset: their fills (1, 0)
                if c.name.startswith("output."):
                    controls.setdefault(c.name, c.initial(self.device))
            if self.binder is not None and any(c.name == "q_ratio" for c in self.layout.controls):
                controls["q_ratio"] = self._q_ratio(key)
            weights = self._weights(model, name)
            online = model.online.get(name)
            contract = self.layout.contract
            extra = contract.bind(state, controls, weights, online.accum if online is not None else None)
        try:
            outs = self.compiled(*args, *extra)
        except BaseException:
            with live.lock:
                model.states.pop((name, ctx), None)
            raise
        got = contract.split(outs)
        with live.lock:
            if model.states.get((name, ctx), (None, None, None))[2] is state:  # else dropped meanwhile
                model.states[(name, ctx)] = (self, key, got.state)
            model.record(tick, name, tick.step, *got.trace)
            if online is not None:
                online.after_step(got.accums, weights)
        return contract.user_result(got.user)


def build_block_runtime(b) -> BlockRuntime:
    """The runtime of a lowered block graph (``backend.FastCacheBackend`` for kind "block")."""
    from .shapes import ShapeBinder

    return BlockRuntime(b, ShapeBinder(b.example_inputs) if b.dynamic else None)


def drive_step_clock(entry: registry.ModelEntry, timestep: torch.Tensor) -> None:
    """Advance the step clock of ``entry``'s block graphs from the model's timestep, read by
    another graph of the model (glue, or a whole-graph fragment): a model that Dynamo split at
    graph breaks, whose blocks Dynamo then compiled one frame each (HunyuanVideo 1.5), gets one
    clock for all its graphs, with trajectories restarting as in the whole-graph rule. A no-op
    without block graphs or when ``enable_fastcache(regional=True)``'s pre-hook drives the clock.
    Reads the timestep's first element on the host (one device sync per step on a GPU)."""
    model = entry.regional
    if model is None or model.hook_installed or timestep is None:
        return
    with entry.requests.lock:
        ctx, tick, began = model.clock.drive(timestep)
        if began:
            model.new_step(ctx, tick)


def install_step_hook(model: torch.nn.Module, regional: RegionalModel):
    """A forward pre-hook on the transformer that drives ``regional.clock`` from its timestep
    argument (keyword ``timestep``, or the positional parameter of that name). Idempotent."""
    if getattr(model, "_fastcache_step_hook", None) is not None:
        return model._fastcache_step_hook
    try:
        pos = list(inspect.signature(model.forward).parameters).index("timestep")
    except ValueError:
        pos = None

    def hook(module, args, kwargs):
        t = kwargs.get("timestep")
        if t is None and pos is not None and len(args) > pos:
            t = args[pos]
        with regional.entry.requests.lock:
            ctx, tick = regional.clock.begin_step(t)
            regional.new_step(ctx, tick)

    regional.hook_installed = True
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    model._fastcache_step_hook = handle
    return handle
