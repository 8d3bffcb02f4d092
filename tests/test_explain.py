"""Graph-diff debugging tools: explain, dumps with stable names, dot, diff, heat map, CLI."""

import json
import re

import numpy as np
import pytest
import torch

from fastcache_fx import cli, zoo
from fastcache_fx.debug.diff import diff_paths, diff_values
from fastcache_fx.debug.explain import NO_BLOCKS, explain
from fastcache_fx.debug.heatmap import decision_heatmap, decision_matrices


@pytest.fixture(scope="module")
def dit_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("dit")
    model, kw = zoo.build("dit")
    report = explain(model, dump_dir=out / "dump", dot_dir=out / "dot", **kw)
    return model, report, out


@pytest.fixture(scope="module")
def reports(dit_report):
    """Reports of the other families, captured once per module."""
    got = {"dit": (dit_report[0], dit_report[1])}
    for family in ("pixart", "sd3", "flux"):
        model, kw = zoo.build(family)
        got[family] = (model, explain(model, **kw))
    return got


def _expected_blocks(family, model):
    cfg = model.config
    if family == "flux":  # double-stream blocks then single-stream blocks
        return ["transformer_blocks.%d" % i for i in range(cfg.num_layers)] + \
               ["single_transformer_blocks.%d" % i for i in range(cfg.num_single_layers)]
    return ["transformer_blocks.%d" % i for i in range(cfg.num_layers)]


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_explain_finds_every_block(reports, family):
    model, report = reports[family]
    assert len(report.graphs) == 1
    g = report.graphs[0]
    assert g.graph_left_alone is None
    assert [b.name for b in g.blocks] == _expected_blocks(family, model)
    assert report.num_blocks == len(g.blocks)
    assert all(len(s) == 3 for b in g.blocks for s in b.stream_shapes)
    if family in ("sd3", "flux"):  # joint blocks carry two streams
        assert len(g.blocks[0].stream_shapes) == 2
    # one cond and one approx branch per block in the rewritten graph
    assert g.diff.count("= torch.ops.higher_order.cond(") == len(g.blocks)
    assert "block " + g.blocks[0].name in report.text()


def test_diff_shows_cond_and_state(dit_report):
    _, report, _ = dit_report
    g = report.graphs[0]
    added = [ln for ln in g.diff.splitlines() if ln.startswith("+")]
    removed = [ln for ln in g.diff.splitlines() if ln.startswith("-")]
    assert any("torch.ops.higher_order.cond" in ln for ln in added)
    assert any(re.match(r"\+fc_step : int64\[\] = state", ln) for ln in added)
    assert any(ln.startswith("+fc_transformer_blocks_0_anchor_in_0 ") for ln in added)
    assert any(ln.startswith("-transformer_blocks.1.linear_0 = ") for ln in removed)
    # glue stays unchanged apart from reading the cond's output
    assert not any(ln.startswith("-glue.conv2d_0") for ln in removed)
    assert "timestep" in g.blocks[0].context_inputs


def test_dump_names_are_canonical(dit_report):
    """Dynamo numbers nodes over the whole graph (linear_3 in block 0 is linear_12 in block 1);
    the dump numbers them per block, so identical blocks dump identically."""
    _, report, _ = dit_report
    lines = report.graphs[0].before.splitlines()
    # "<name> = <target>" of each node (the stream inputs differ: glue vs. the previous block)
    body = {b: [ln.replace(b + ".", "BLOCK.").split("(", 1)[0] for ln in lines
                if ln.startswith(b + ".") and "= param" not in ln]
            for b in ("transformer_blocks.0", "transformer_blocks.1")}
    assert len(body["transformer_blocks.0"]) == report.graphs[0].blocks[0].num_nodes
    assert body["transformer_blocks.0"] == body["transformer_blocks.1"]
    calls = [ln for ln in lines if " = " in ln and not ln.startswith("#") and "= param" not in ln
             and "= input" not in ln and not ln.startswith("return")]
    assert calls and all(ln.startswith(("glue.", "transformer_blocks.")) for ln in calls)


def test_dump_dot_and_diff_cli(dit_report, tmp_path, capsys):
    _, report, out = dit_report
    dump, dot = out / "dump", out / "dot"
    names = sorted(p.name for p in dump.iterdir())
    assert names == ["explain.txt", "graph_0.diff", "graph_0_after.txt", "graph_0_before.txt"]
    text = (dot / "graph_0.dot").read_text()
    assert text.startswith('digraph "graph 0"') and text.rstrip().endswith("}")
    assert '"transformer_blocks.0" -> "transformer_blocks.1" [label="float32[2, 16, 16]"' in text
    assert cli.main(["diff", str(dump / "graph_0_before.txt"), str(dump / "graph_0_after.txt")]) == 1
    assert "torch.ops.higher_order.cond" in capsys.readouterr().out
    assert cli.main(["diff", str(dump / "graph_0_after.txt"), str(dump / "graph_0_after.txt")]) == 0
    assert cli.main(["diff", str(dump), str(dump)]) == 0
    assert cli.main(["diff", str(dump / "missing.txt"), str(dump / "graph_0.diff")]) == 2


def test_module_without_blocks_is_left_alone(monkeypatch):
    artifacts = []
    monkeypatch.setenv("TORCH_TRACE", "/nonexistent")  # only read as a switch by explain
    real = torch._logging.trace_structured

    def record(kind, metadata_fn=dict, *, payload_fn=lambda: None, **kw):
        if kind != "artifact":
            return real(kind, metadata_fn, payload_fn=payload_fn, **kw)
        artifacts.append((kind, metadata_fn(), payload_fn()))

    monkeypatch.setattr(torch._logging, "trace_structured", record)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)).eval()
    report = explain(model, torch.randn(2, 4, 8))
    g = report.graphs[0]
    assert g.graph_left_alone == NO_BLOCKS and g.blocks == [] and g.diff == ""
    assert g.before == g.after and g.before.count("= torch._C._nn.linear(") == 2
    assert "0.weight : float32[8, 8] = param" in g.before
    assert f"left alone: {NO_BLOCKS}" in report.text()
    assert report.num_blocks == 0
    assert [(k, m["name"], m["encoding"]) for k, m, _ in artifacts] == [
        ("artifact", "fastcache_before_0", "string"), ("artifact", "fastcache_after_0", "string")]
    assert artifacts[0][2] == g.before


def _manifest(threshold):
    return {"config": {"cache_ratio_threshold": threshold, "significance_level": 0.05, "approx": "residual"},
            "blocks": ["transformer_blocks.0", "transformer_blocks.1"],
            "inputs": {"hidden_states": {"shape": [2, 4, 8, 8], "dtype": "float32"}},
            "graphs": [{"nodes": 226, "state": ["fc_step", "fc_prev_t"]}]}


def test_diff_manifests_names_exactly_the_changed_field(tmp_path, capsys):
    a, b = tmp_path / "a" / "manifest.json", tmp_path / "b" / "manifest.json"
    for p, thr in ((a, 0.05), (b, 0.1)):
        p.parent.mkdir()
        p.write_text(json.dumps(_manifest(thr), indent=2))
    assert diff_paths(a, b).lines == ["config.cache_ratio_threshold: 0.05 -> 0.1"]
    assert cli.main(["diff", str(a), str(b)]) == 1
    assert capsys.readouterr().out == "config.cache_ratio_threshold: 0.05 -> 0.1\n"
    assert cli.main(["diff", str(a), str(a)]) == 0
    # nested lists, shapes and missing keys
    other = _manifest(0.05)
    other["inputs"]["hidden_states"]["shape"] = [2, 4, 16, 16]
    other["graphs"][0]["state"].append("fc_x")
    del other["config"]["approx"]
    assert diff_values(_manifest(0.05), other) == [
        'config.approx: "residual" -> <absent>',
        'graphs[0].state: ["fc_step", "fc_prev_t"] -> ["fc_step", "fc_prev_t", "fc_x"]',
        "inputs.hidden_states.shape: [2, 4, 8, 8] -> [2, 4, 16, 16]"]


def _fake_stats(tokens=False):
    blocks = ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    trace = []
    for ctx in ("cond", "uncond"):
        for s in range(5):
            t = {"context": ctx, "step": s, "blocks": blocks, "approx": [s >= 2 and i != 1 for i in range(3)],
                 "delta": [float("inf") if s == 0 else 0.02 * (i + 1) * s for i in range(3)],
                 "threshold": [0.05, 0.05, 0.05]}
            if tokens:
                t["tokens"] = [16, 16 - s, 16]
            trace.append(t)
    return {"blocks": blocks, "trace": trace}


def test_heatmap_of_fake_stats(tmp_path):
    path = tmp_path / "heat.png"
    drawn = decision_heatmap(_fake_stats(), path)
    assert drawn.shape == (3, 5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isnan(drawn[:, 0]).all()  # no anchor yet: delta is inf
    np.testing.assert_allclose(drawn[:, 1], [0.4, 0.8, 1.2])
    assert drawn[2, 4] == 2.0  # clipped
    m = decision_matrices(_fake_stats(), context="uncond")
    assert m["context"] == "uncond" and m["approx"].sum() == 6 and m["tokens"] is None
    with_tokens = tmp_path / "heat_tokens.png"
    assert decision_heatmap(_fake_stats(tokens=True), with_tokens).shape == (3, 5)
    assert with_tokens.stat().st_size > 0
    assert decision_matrices(_fake_stats(tokens=True))["tokens"].shape == (3, 5)
    with pytest.raises(ValueError, match="context"):
        decision_heatmap(_fake_stats(), tmp_path / "x.png", context="nope")


def test_heatmap_groups_graph_break_entries():
    """Two graphs (a graph break) record one entry each per call: one column per call."""
    trace = []
    for s in range(4):
        trace.append({"context": "default", "step": s, "blocks": ["a"], "approx": [False], "delta": [0.01],
                      "threshold": [0.05]})
        trace.append({"context": "default", "step": s, "blocks": ["b"], "approx": [True], "delta": [0.02],
                      "threshold": [0.05]})
    m = decision_matrices({"trace": trace})
    assert m["ratio"].shape == (2, 4) and m["approx"][1].all() and not m["approx"][0].any()


def test_explain_cli(tmp_path, capsys, monkeypatch):
    d = tmp_path / "out"
    assert cli.main(["explain", "--model", "pixart", "--dump", str(d), "--dot", str(d), "--no-diff"]) == 0
    out = capsys.readouterr().out
    assert "block transformer_blocks.1 (BasicTransformerBlock)" in out and "graph diff" not in out
    assert (d / "graph_0.dot").exists() and (d / "graph_0_after.txt").exists()

    import fastcache_fx.reference as R

    def missing(*a, **k):
        raise FileNotFoundError("reference model record dit.json is missing")

    monkeypatch.setattr(R, "load", missing)
    assert cli.main(["explain", "--model", "reference"]) == 2
    assert "reference weights are missing" in capsys.readouterr().err


def test_explain_cli_trace(tmp_path, capsys):
    """--trace compiles with backend="fastcache" (Inductor) and draws the steps it ran."""
    png = tmp_path / "trace.png"
    assert cli.main(["explain", "--model", "dit", "--no-diff", "--trace", str(png), "--steps", "4"]) == 0
    assert "4 steps, block_approx_ratio" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_explain_reports_the_kind_the_backend_builds():
    """explain and the backend ask the same approximation-kind object: ``approx="taylor"`` without a
    calibration is the Taylor forecast (explain used to print residual reuse), with its state cost;
    a calibrated kind without a file falls back to residual reuse in both, with one warning."""
    model, kw = zoo.build("dit")
    text = explain(model, config={"approx": "taylor", "taylor_order": 2}, **kw).text(diff=False)
    assert "approx=taylor" in text and "Taylor forecast" in text and "4 stream-sized tensors" in text
    with pytest.warns(UserWarning, match="falling back to approx='residual'"):
        text = explain(model, config={"approx": "linear"}, **kw).text(diff=False)
    assert "approx=residual" in text and "2 stream-sized tensors" in text
