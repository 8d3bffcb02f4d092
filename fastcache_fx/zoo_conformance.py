"""The conformance check of the rules users run, on every class of ``zoo_classes``.

``check_rule(name, rule, entry)`` builds ``name``'s model from its tiny config, compiles it with
one of the ``RULES`` (the default options; the fast setting) through one of the ``ENTRIES``
(a bare ``torch.compile(model, backend="fastcache")``; ``enable_fastcache``), runs a scripted
trajectory (``trajectory``: falling timestep, latent drifting 1 % a step) and reports, per block
list, the share of its block computations that were approximated, the fallback reasons and the
warnings. It then replays the run eagerly (``EagerReplay``): the uncompiled model with forward
hooks that, at every block (or span) the compiled run approximated, replace its output by its
input plus the cached residual (the Taylor forecast of the residuals for ``approx="taylor"``)
from the eager run's own last full computation; the largest relative difference between the two
runs' outputs is ``replay_rel_err`` (Inductor vs eager on these fp32 models: ~1e-6; a wrong
residual, a stale anchor or a skipped block: > 1e-2).
"""

from __future__ import annotations

import inspect
import re
import warnings

import torch

from . import zoo_classes
from .zoo_classes import SPECS, build, output_tensor
from . import torch_compat

#: the rules of the table: the default options and the fastest documented setting (README)
RULES = {
    "default": {},
    "fast": {"cache_level": "step", "front_blocks": 0, "approx": "taylor", "taylor_order": 2},
}
#: the two entry points
ENTRIES = ("backend", "enable")


def trajectory(name: str, steps: int = 10, batch: int = 1, seed: int = 0, drift: float = 0.01) -> list[dict]:
    """The forward kwargs of ``steps`` steps of ``name``'s model (``zoo_classes.trajectory``): the
    timestep falls linearly from ``t_max`` to ``t_max / steps`` (rises, for a ``rising`` class:
    ``zoo_spec.scripted_timestep``); the latent moves by ``drift`` (relative to its norm, of a
    fixed standard-normal direction) per step.

    Raises:
        ValueError: ``name`` not in ``SPECS``; ``steps`` < 1.
    """
    return zoo_classes.trajectory(name, steps, batch, seed, drift=drift, relative=True)


def compile_model(model, rule: str, entry: str):
    """``model`` compiled with ``RULES[rule]`` through ``entry`` ("backend": a bare
    ``torch.compile(model, backend="fastcache", options=...)``; "enable": ``enable_fastcache``).

    Raises:
        ValueError: an unknown ``rule`` or ``entry``.
    """
    import fastcache_fx

    if rule not in RULES:
        raise ValueError(f"rule: expected one of {sorted(RULES)}, got {rule!r}")
    if entry == "backend":
        return torch.compile(model, backend="fastcache", options=dict(RULES[rule]) or None)
    if entry == "enable":
        return fastcache_fx.enable_fastcache(model, **RULES[rule])
    raise ValueError(f"entry: expected one of {ENTRIES}, got {entry!r}")


def block_names(model) -> list[str]:
    """``list.i`` of every block of ``model``, in model order (``passes.blocks.block_lists``)."""
    from .passes.blocks import block_lists

    return [f"{lst}.{i}" for lst, ml in block_lists(model) for i in range(len(ml))]


def transformer_lists(model) -> list[str]:
    """The block lists of ``model`` whose element class is named a block or a layer."""
    from .passes.blocks import block_lists

    return [lst for lst, ml in block_lists(model) if re.search(r"Block|Layer", type(ml[0]).__name__)]


def region_blocks(region: str, order: list[str]) -> list[str]:
    """The blocks a region of ``stats()`` covers: ``a.3`` (a block), ``a.1-3`` (a span of one list),
    ``a.1-b.0`` (a span across lists), in ``order``."""
    if region in order:
        return [region]
    m = re.match(r"^(?P<first>.+?\.\d+)-(?P<last>.+)$", region)
    if m is None:
        return []
    first, last = m["first"], m["last"]
    if last.isdigit():
        last = first.rsplit(".", 1)[0] + "." + last
    if first not in order or last not in order:
        return []
    return order[order.index(first):order.index(last) + 1]


def decisions_per_step(st: dict) -> list[dict[str, bool]]:
    """{region: approximated} per step of the (one) trajectory in ``stats()["trace"]``, merging the
    records of graphs and block instances that served the same step."""
    steps: list[dict[str, bool]] = []
    for rec in st["trace"]:
        while len(steps) <= rec["step"]:
            steps.append({})
        for name, a in zip(rec["blocks"], rec["approx"]):
            steps[rec["step"]][name] = bool(a)
        for name in rec.get("computed", []):
            steps[rec["step"]][name] = False
    return steps


def share_per_list(st: dict, order: list[str]) -> dict[str, float]:
    """{block list: approximated / all of its block computations} over the trajectory: the lists
    ``stats()`` names blocks of, else (nothing cached) the lists of ``order`` whose class is a
    block or layer (a ModuleList of projections is no block list)."""
    named = {b.rsplit(".", 1)[0] for r in st["blocks"] for b in region_blocks(r, order)}
    lists = [lst for lst in dict.fromkeys(n.rsplit(".", 1)[0] for n in order) if lst in named]
    num = {lst: 0 for lst in lists}
    den = {lst: 0 for lst in lists}
    for step in decisions_per_step(st):
        for region, a in step.items():
            for b in region_blocks(region, order):
                lst = b.rsplit(".", 1)[0]
                den[lst] += 1
                num[lst] += int(a)
    return {lst: (num[lst] / den[lst] if den[lst] else 0.0) for lst in lists}


class EagerReplay:
    """The uncompiled model replaying a compiled run's decisions with the cached residuals.

    For each region (block or span) it keeps, per output stream, the anchor residual
    Y_last - H_first of its last full computation (and for ``taylor`` the last ``order`` + 1
    residuals with their timesteps); at a step where the region was approximated its last block
    returns H_first + R (or + the forecast R_hat(t), ``ops.forecast.taylor_weights``) and the
    blocks before it inside the region return their inputs. A block's output streams are paired
    with its inputs of the same shape (the residual stream), preferring positional arguments and
    ``*hidden_states`` keywords (over other same-shaped inputs); where two of those have that shape,
    the one nearest the output at the first full computation.
    """

    def __init__(self, model, regions: list[str], order: list[str], approx: str = "residual", taylor_order: int = 1):
        self.model = model
        self.modules = dict(model.named_modules())
        self.order = order
        self.regions = {r: region_blocks(r, order) for r in regions}
        self.approx, self.taylor_order = approx, taylor_order
        self.history: dict[str, list[tuple[float, list]]] = {}
        self.pairing: dict[str, list] = {}

    def _inputs(self, name, args, kwargs) -> list[tuple[str, torch.Tensor]]:
        mod = self.modules[name]
        try:
            bound = inspect.signature(mod.forward).bind(*args, **kwargs).arguments
        except TypeError:
            bound = {f"arg{i}": a for i, a in enumerate(args)} | dict(kwargs)
        cands = [(k, v) for k, v in bound.items() if isinstance(v, torch.Tensor) and v.dim() >= 2]
        first = list(bound)[0] if bound else None
        return sorted(cands, key=lambda kv: (kv[0] != first and not kv[0].endswith("hidden_states")))

    def _pair(self, name, inputs, outs) -> list:
        """Per output tensor, the index into ``inputs`` of its stream input (None: not a stream)."""
        if name not in self.pairing:
            pairs = []
            for o in outs:
                same = [i for i, (_, v) in enumerate(inputs) if isinstance(o, torch.Tensor) and v.shape == o.shape]
                # a stream is the first argument or a *hidden_states one, not a same-shaped
                # context (Cosmos's extra_pos_emb)
                named = [i for i in same if i == 0 or inputs[i][0].endswith("hidden_states")]
                same = named or same
                if len(same) > 1:
                    same.sort(key=lambda i: float((o - inputs[i][1]).norm()))
                pairs.append(same[0] if same else None)
            self.pairing[name] = pairs
        return self.pairing[name]

    def run(self, kwargs: dict, decisions: dict[str, bool], t: float, first_step: bool):
        if first_step:
            self.history = {}
        first_of = {bl[0]: r for r, bl in self.regions.items() if bl}
        last_of = {bl[-1]: r for r, bl in self.regions.items() if bl}
        member = {b: r for r, bl in self.regions.items() for b in bl}
        entry_streams: dict[str, list] = {}
        handles = []

        def hook(name):
            def fn(mod, args, kw, out):
                region = member.get(name)
                if region is None:
                    return None
                outs = list(out) if isinstance(out, (tuple, list)) else [out]
                inputs = self._inputs(name, args, kw)
                pairs = self._pair(name, inputs, outs)
                if name in first_of.keys() and first_of[name] == region:
                    entry_streams[region] = [inputs[p][1] if p is not None else None for p in pairs]
                if not decisions.get(region, False):
                    if last_of.get(name) == region:  # a full computation: new anchor residual
                        res = [(o - h) if h is not None and isinstance(o, torch.Tensor) else None
                               for o, h in zip(outs, self._entry(region, entry_streams, pairs, inputs, outs))]
                        hist = self.history.setdefault(region, [])
                        hist.insert(0, (t, res))
                        del hist[self.taylor_order + 1:]
                    return None
                if last_of.get(name) == region:
                    hs = self._entry(region, entry_streams, pairs, inputs, outs)
                    r_hat = self._forecast(region, t)
                    new = [h + r if h is not None and r is not None else o for o, h, r in zip(outs, hs, r_hat)]
                else:  # inside an approximated span: the block is skipped
                    new = [inputs[p][1] if p is not None else o for o, p in zip(outs, pairs)]
                return type(out)(new) if isinstance(out, (tuple, list)) else new[0]
            return fn

        for name in member:
            handles.append(self.modules[name].register_forward_hook(hook(name), with_kwargs=True))
        try:
            with torch.no_grad():
                return output_tensor(self.model(**kwargs))
        finally:
            for h in handles:
                h.remove()

    def _entry(self, region, entry_streams, pairs, inputs, outs):
        """The region's stream input H_first of each of its last block's outputs: the first block's
        stream inputs in order where they match the outputs' shapes, else (a span across lists
        whose streams differ, Kandinsky 5's text -> visual) the last block's own stream input,
        which then entered the region from outside it."""
        own = [inputs[p][1] if p is not None else None for p in pairs]
        got = entry_streams.get(region)
        if got is None:
            return own
        # (an output that is None: SD3's last block, context_pre_only, returns no text stream)
        if len(got) == len(outs) and all(h is None or o is None or (isinstance(o, torch.Tensor) and h.shape == o.shape)
                                         for h, o in zip(got, outs)):
            return got
        return own

    def _forecast(self, region: str, t: float) -> list:
        from .ops.forecast import taylor_weights

        hist = self.history[region]
        if self.approx != "taylor":
            return hist[0][1]
        k = self.taylor_order + 1
        ts = torch.tensor([h[0] for h in hist] + [float("nan")] * (k - len(hist)))
        w = taylor_weights(ts, torch.tensor(len(hist)), torch.tensor(float(t)), self.taylor_order)
        out = []
        for s in range(len(hist[0][1])):
            if hist[0][1][s] is None:
                out.append(None)
                continue
            out.append(sum(float(w[j]) * hist[j][1][s] for j in range(len(hist))))
        return out


def check_rule(name: str, rule: str, entry: str, steps: int = 10, seed: int = 0, replay: bool = True) -> dict:
    """One cell of the conformance table: ``name``'s model under ``RULES[rule]`` through ``entry``
    on ``trajectory(name, steps)``.

    Returns:
        dict with ``cls``, ``kind``, ``rule``, ``entry``; ``per_list`` {block list: approximated
        share of its block computations}; ``approx_ratio`` (all blocks); ``fallback`` (the reasons
        of ``stats()``); ``warnings`` (fastcache warnings raised); ``graphs`` {kind: count};
        ``refused`` {block list: reason} for lists never approximated whose every block has a
        reason in ``stats()["not_approximated"]``;
        ``replay_rel_err`` (max over steps of ||compiled - eager replay|| / ||eager replay||, None
        where ``replay`` is off); ``finite``.

    Raises:
        ValueError: an unknown ``name``, ``rule`` or ``entry``.
    """
    import fastcache_fx

    spec = SPECS[name]
    model, _ = build(name, seed)
    order = block_names(model)
    traj = trajectory(name, steps, seed=seed)
    torch.compiler.reset()
    with torch_compat.inductor_config_patch(spec.inductor), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = compile_model(model, rule, entry)
        with torch.no_grad():
            # one call first: a bare torch.compile of a model that needs preparing traces it whole
            # from its second call on (runtime.prepare); the trajectory then starts from a reset
            compiled(**traj[0])
        fastcache_fx.reset(compiled)
        with torch.no_grad():
            outs = [output_tensor(compiled(**kw)).clone() for kw in traj]
    st = fastcache_fx.stats(compiled)
    graphs: dict[str, int] = {}
    for g in st["per_graph"]:
        graphs[g["kind"]] = graphs.get(g["kind"], 0) + 1
    row = {"cls": spec.cls, "kind": spec.kind, "rule": rule, "entry": entry,
           "per_list": share_per_list(st, order) or {lst: 0.0 for lst in transformer_lists(model)}, "approx_ratio": st["block_approx_ratio"],
           "fallback": st["fallback"], "graphs": graphs,
           "warnings": sorted({str(w.message)[:300] for w in caught if "fastcache" in str(w.message)}),
           "finite": all(bool(torch.isfinite(o).all()) for o in outs), "replay_rel_err": None}
    row["refused"] = refused_lists(row["per_list"], st, order)
    if replay:
        decisions = decisions_per_step(st)
        regions = sorted({r for d in decisions for r in d})
        cfg = fastcache_fx.FastCacheConfig(**RULES[rule])
        er = EagerReplay(registry_model(model), regions, order, cfg.approx, cfg.taylor_order or 1)
        errs = []
        with torch_compat.inductor_config_patch(spec.inductor):
            skip = len(traj) - len(decisions)  # calls no graph with blocks recorded (computed fully)
            for k, kw in enumerate(traj):
                ref = er.run(kw, decisions[k - skip] if k >= skip else {}, float(kw[spec.timestep].flatten()[0]),
                             k in (0, skip))
                errs.append(_rel(outs[k], ref))
        row["replay_rel_err"] = max(errs)
        row["replay_errs"] = errs
    return row


def refused_lists(per_list: dict[str, float], st: dict, order: list[str]) -> dict[str, str]:
    """{block list: reason} of the lists of ``per_list`` never approximated whose every block
    ``stats()["not_approximated"]`` gives a reason for (the first reason)."""
    why = {b: r for region, r in st.get("not_approximated", {}).items() for b in region_blocks(region, order)}
    out = {}
    for lst, share in per_list.items():
        members = [b for b in order if b.rsplit(".", 1)[0] == lst]
        if share <= 0 and members and all(b in why for b in members):
            out[lst] = why[members[0]]
    return out


def registry_model(model):
    """The module itself (a compiled wrapper's ``_orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
