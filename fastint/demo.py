"""`fastint demo`: every implemented method on the built-in analytic mixture.

For each process the same prior draws are integrated by every method at several NFEs.
Deterministic methods are scored by their endpoint error against scipy's DOP853 solution
of the exact PF-ODE (denoised with the same exact Tweedie step); every method is also
scored by the sliced W2 distance of its samples to exact data draws.
"""
import time

import torch

from .coefficients import METHODS
from .metrics import sliced_wasserstein
from .models import GaussianMixture, reference_solution, tweedie_reference
from .processes import CLD, PSLD, VPSDE
from .sampler import Sampler, _progress

PROCESSES = {"vp": VPSDE, "psld": PSLD, "cld": CLD}


def run_demo(processes=("vp", "psld", "cld"), nfes=(10, 20, 50, 100), batch=512, seed=0, grid="quadratic",
             progress=True, out=print):
    rows = []
    jobs = [(p, m, n) for p in processes for m in METHODS for n in nfes if p == "vp" or not METHODS[m].vp_only]
    refs = {}
    for name in processes:
        sde = PROCESSES[name]()
        model = GaussianMixture.default(sde)
        g = torch.Generator().manual_seed(seed)
        zT = sde.prior_sample((batch, *model.data_shape), generator=g, dtype=torch.float64)
        z_ref = reference_solution(model, sde, zT)
        x_ref = sde.data_part(tweedie_reference(model, sde, z_ref, 1e-3))
        data = model.sample_data(batch, generator=torch.Generator().manual_seed(seed + 1))
        refs[name] = (sde, model, zT, x_ref, data)
    for name, method, nfe in _progress(jobs, progress, "demo"):
        sde, model, zT, x_ref, data = refs[name]
        sampler = Sampler(sde, method=method, nfe=nfe, grid=grid)
        t0 = time.perf_counter()
        x = sampler.sample(model, zT.float(), generator=torch.Generator().manual_seed(seed + 2))
        wall = time.perf_counter() - t0
        err = None
        if not METHODS[method].stochastic:
            err = float((x.double() - x_ref).flatten(1).norm(dim=1).mean())
        sw2 = sliced_wasserstein(x, data, generator=torch.Generator().manual_seed(seed + 3))
        rows.append((name, method, nfe, err, sw2, wall))
    ref_sw2 = {n: sliced_wasserstein(refs[n][3], refs[n][4], generator=torch.Generator().manual_seed(seed + 3))
               for n in processes}
    out(f"fastint demo: 8-mode Gaussian mixture in 2-D, {batch} samples, grid={grid}, t_eps=1e-3, denoise=True")
    out("err = mean |x - x_ref| against the DOP853 (rtol 1e-10) PF-ODE solution; SW2 = sliced W2 to exact data draws")
    out(f"{'process':8} {'method':11} {'NFE':>4} {'err':>10} {'SW2':>8} {'wall ms':>8}")
    for name, method, nfe, err, sw2, wall in rows:
        e = "—" if err is None else f"{err:.2e}"
        out(f"{name:8} {method:11} {nfe:>4} {e:>10} {sw2:>8.4f} {wall * 1e3:>8.1f}")
    for n in processes:
        out(f"{n:8} {'DOP853':11} {'':>4} {'0':>10} {ref_sw2[n]:>8.4f}   (reference; SW2 floor from {batch} samples)")
    return rows
