"""Whole-loop compilation: Sampler.sample traces as ONE graph with no break (so no .item(),
no branch on tensor values), every step unrolled into it, and is not recompiled per step or
per call. CUDA-graph capture is checked when a GPU is present."""
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

import fastint

CASES = [
    ("vp", "ddim", {}),
    ("vp", "lambda_ddim", {"lam": -0.5}),
    ("vp", "conj_ms", {"k": 3}),
    ("vp", "euler", {}),
    ("vp", "sddim", {"noise": "torch", "eta": 0.5}),
    ("psld", "ddim", {}),
    ("vp", "sddim", {"eta": 0.5}),  # Philox: the key is a tensor drawn in the graph
    ("psld", "conj_ms", {"k": 2}),
    ("cld", "em", {"noise": "torch"}),
]
PROCS = {"vp": fastint.VPSDE, "psld": fastint.PSLD, "cld": fastint.CLD}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles Sampler.sample for a new sampler: start from an empty dynamo cache so
    the per-code-object recompile limit never mixes tests."""
    dynamo.reset()
    yield
    dynamo.reset()


def _setup(proc, method, kw, nfe=6):
    torch.manual_seed(0)
    sde = PROCS[proc]()
    sampler = fastint.Sampler(sde, method, nfe=nfe, **kw)
    ch = 2 * sde.dim
    conv = torch.nn.Conv2d(ch, ch, 1)

    def model(z, t):
        return torch.tanh(conv(z)) * t[:, None, None, None]
    zT = sde.prior_sample((2, 2, 4, 4), generator=torch.Generator().manual_seed(1))
    return sampler, model, zT


def _graphs_of(fn, *args):
    """Compile fn with a backend that records every graph dynamo hands it."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs, out


@pytest.mark.parametrize("proc,method,kw", CASES, ids=[f"{p}-{m}" for p, m, _ in CASES])
def test_sample_is_one_graph_without_breaks(proc, method, kw):
    sampler, model, zT = _setup(proc, method, kw)
    sampler.sample(model, zT)  # eager first: fills the per-device table cache
    explained = dynamo.explain(sampler.sample)(model, zT)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    graphs, _ = _graphs_of(sampler.sample, model, zT)
    assert len(graphs) == 1
    ops = (torch.ops.fastint.step, torch.ops.fastint.step.default, torch.ops.fastint.step_out,
           torch.ops.fastint.step_out.default)
    steps = [n for n in graphs[0].graph.nodes if n.target in ops]
    rows = sampler.table.shape[0]
    assert len(steps) == rows  # every step of the loop is in the one graph
    convs = [n for n in graphs[0].graph.nodes if "conv" in str(n.target)]
    assert len(convs) == sampler.nfe


@pytest.mark.parametrize("proc,method,kw", CASES[:3] + CASES[4:5] + CASES[6:7],
                         ids=["ddim", "lambda_ddim", "conj_ms", "sddim", "sddim-philox"])
def test_no_recompilation_across_calls(proc, method, kw):
    """Three calls with new data compile one frame once (guards do not depend on step or data)."""
    sampler, model, zT = _setup(proc, method, kw)
    sampler.sample(model, zT)
    cnt = CompileCounter()
    f = torch.compile(sampler.sample, backend=cnt, fullgraph=True)
    outs = [f(model, zT * (1 + 0.1 * i)) for i in range(3)]
    assert cnt.frame_count == 1
    if not sampler.info.stochastic:
        assert torch.allclose(outs[1], sampler.sample(model, zT * 1.1), rtol=0, atol=1e-6)
    else:  # fresh draws every call from the global RNG (noise, or the Philox key), one compiled graph
        a, b = f(model, zT), f(model, zT)
        assert cnt.frame_count == 1 and not torch.equal(a, b)
        torch.manual_seed(5)
        c = f(model, zT)
        torch.manual_seed(5)
        assert torch.equal(c, sampler.sample(model, zT))


def test_aot_compiled_matches_eager():
    """Through AOTAutograd (fake kernels, functionalisation) the compiled loop equals eager."""
    sampler, model, zT = _setup("psld", "conj_ms", {"k": 2})
    eager = sampler.sample(model, zT)
    compiled = torch.compile(sampler.sample, backend="aot_eager", fullgraph=True)(model, zT)
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-6)


def test_philox_key_from_a_generator_compiles_run_once():
    """A torch.Generator cannot enter a compiled frame; drawing the key outside and compiling
    run() gives one graph for every key, reproducible per generator seed."""
    sampler, model, zT = _setup("vp", "sddim", {"eta": 0.5})
    table, pc = sampler.device_table(zT.device)
    cnt = CompileCounter()
    f = torch.compile(sampler.run, backend=cnt, fullgraph=True)
    key = lambda s: sampler.philox_key(torch.Generator().manual_seed(s))  # noqa: E731
    a, b, c = (f(model, zT, table, pc, key(s)) for s in (1, 2, 1))
    assert cnt.frame_count == 1
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert torch.equal(a, sampler.sample(model, zT, generator=torch.Generator().manual_seed(1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method,kw", [("ddim", {}), ("conj_ms", {"k": 3}), ("sddim", {"noise": "torch"}),
                                       ("sddim", {})])
def test_cuda_graph_capture(method, kw):
    """The whole loop captured into one CUDA graph replays to the eager result (no host sync
    inside: capture would fail on one)."""
    torch.manual_seed(0)
    sde = fastint.VPSDE()
    sampler = fastint.Sampler(sde, method, nfe=8, **kw)
    conv = torch.nn.Conv2d(3, 3, 1).cuda()
    model = lambda z, t: torch.tanh(conv(z)) * t[:, None, None, None]  # noqa: E731
    zT = torch.randn(4, 3, 16, 16, device="cuda")
    table, pc = sampler.device_table(zT.device)
    static_in = zT.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    # Philox: the key is drawn inside the capture from the CUDA generator (graph-safe), so
    # every replay keys the kernels afresh.
    with torch.cuda.stream(stream), torch.no_grad():
        sampler.run(model, static_in, table, pc, sampler.philox_key(None, "cuda"))  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = sampler.run(model, static_in, table, pc, sampler.philox_key(None, "cuda"))
    new = torch.randn_like(zT)
    static_in.copy_(new)
    graph.replay()
    if sampler.info.stochastic:
        first = static_out.clone()
        graph.replay()  # graph-safe RNG: a replay draws fresh noise
        assert not torch.equal(first, static_out)
    else:
        with torch.no_grad():
            eager = sampler.run(model, new, table, pc)
        assert torch.allclose(static_out, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("proc,prediction", [("vp", "x0"), ("vp", "v"), ("vp", "score"), ("psld", "score"),
                                             ("flow", "flow")])
def test_sample_of_a_prediction_model_compiles_cold(proc, prediction):
    """torch.compile(sample, fullgraph=True) on a fresh Sampler whose model predicts x0, v or the
    score: the conversion rows are made at construction, so nothing traces the process's checked
    schedule functions (it used to fail: 'Could not guard on data-dependent expression')."""
    dynamo.reset()
    sde = {"vp": fastint.VPSDE, "psld": fastint.PSLD, "flow": lambda: fastint.FlowMatch(3.0)}[proc]()
    sampler = fastint.Sampler(sde, "ddim", nfe=3, prediction=prediction)
    zT = sde.prior_sample((2, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    model = lambda z, t: 0.3 * torch.tanh(z)  # noqa: E731
    compiled = torch.compile(sampler.sample, backend="aot_eager", fullgraph=True)(model, zT)
    torch.testing.assert_close(compiled, sampler.sample(model, zT), rtol=1e-5, atol=1e-6)
    dynamo.reset()
