"""The sampling loop: one model call, then one fused step op, per table row.

Everything numerical is precomputed: the integrator is a float64 table built once
(fastint.coefficients), copied to the sampling device in float32, and applied row by row
by torch.ops.fastint.step. The loop itself never reads a tensor value on the host, so it
can be captured by torch.compile(fullgraph=True) and by CUDA graphs.
"""
import torch

from .coefficients import METHODS, build_table, check_names
from .ops import step as fused_step
from .processes import VPSDE

PREDICTIONS_VP = ("eps", "score", "x0", "v")
PREDICTIONS_AUG = ("eps", "score")
NOISE_SOURCES = ("philox", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar, same result
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


class Sampler:
    """A configured integrator for one process: `Sampler(sde, method, nfe, ...).sample(model, zT)`.

    Args:
        sde: a fastint process (VPSDE, PSLD, CLD).
        method: integrator name, one of fastint.METHODS.
        nfe: exact number of model calls per sample.
        grid: time grid, one of fastint.coefficients.GRIDS.
        t_eps: the smallest time reached by the integrator, in (0, T).
        denoise: if True the last model call maps t_eps to the posterior mean (Tweedie);
            it is one of the `nfe` calls.
        prediction: what the model returns: "eps", "score", or (VP only) "x0" / "v".
        noise: for stochastic methods, "philox" (normals made inside the kernel from a
            seed drawn from the generator) or "torch" (torch.randn with the generator,
            for bitwise parity with torch-based pipelines).
        **options: the method's options (fastint.METHODS[method].options), e.g.
            `lam=0.5, b="ones"` for lambda_ddim, `eta=0.3` for sddim, `k=3` for conj_ms;
            unset options take the method's defaults (for lambda_ddim, lam and b tuned per
            process and NFE: fastint.tuning, docs/tuning.md).
    """

    def __init__(self, sde, method="ddim", nfe=50, grid="quadratic", t_eps=1e-3, denoise=True,
                 prediction="eps", noise="philox", **options):
        check_names(sde, method, grid)
        if isinstance(nfe, bool) or not isinstance(nfe, int):
            raise TypeError(f"nfe must be an int, got {type(nfe).__name__}")
        if not isinstance(denoise, bool):
            raise TypeError(f"denoise must be a bool, got {type(denoise).__name__}")
        info = METHODS[method]
        n_steps = (nfe - int(denoise)) // info.calls_per_step
        if n_steps < 1 or n_steps * info.calls_per_step + int(denoise) != nfe:
            raise ValueError(
                f"nfe={nfe} does not fit method {method!r} ({info.calls_per_step} call(s) per step"
                f"{', plus 1 denoising call' if denoise else ''}): at least 1 step is needed"
            )
        allowed = PREDICTIONS_VP if isinstance(sde, VPSDE) else PREDICTIONS_AUG
        if prediction not in allowed:
            raise ValueError(f"prediction must be one of {allowed} for {type(sde).__name__}, got {prediction!r}")
        if noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
        self.sde, self.method, self.nfe, self.grid = sde, method, nfe, grid
        self.t_eps, self.denoise, self.prediction, self.noise = float(t_eps), denoise, prediction, noise
        self.info = info
        self.n_steps = n_steps
        self.options = dict(options)
        self.table, self.times = build_table(sde, method, grid, n_steps, t_eps=t_eps, denoise=denoise, **options)
        # Rows whose time is NaN make no model call (a splitting step's opening map): host data, read once.
        self._calls = [bool(c) for c in torch.isfinite(self.times)]
        self._device_cache = {}

    def __repr__(self):
        return (f"Sampler({type(self.sde).__name__}, method={self.method!r}, nfe={self.nfe}, grid={self.grid!r}, "
                f"t_eps={self.t_eps}, denoise={self.denoise}, prediction={self.prediction!r}"
                + "".join(f", {k}={v!r}" for k, v in self.options.items()) + ")")

    # ---- device copies, made once per device ----------------------------------------
    def _device_tables(self, device):
        key = str(device)
        if key not in self._device_cache:
            times = self.times
            conv = self._prediction_coefficients(torch.nan_to_num(times, nan=self.sde.T))
            self._device_cache[key] = (
                self.table.to(device=device, dtype=torch.float32).contiguous(),
                times.to(device=device, dtype=torch.float32),
                None if conv is None else conv.to(device=device, dtype=torch.float32),
            )
        return self._device_cache[key]

    def _prediction_coefficients(self, times):
        """Per-row float64 coefficients turning the model's output into eps."""
        sde = self.sde
        if self.prediction == "eps":
            return None
        if self.prediction == "score":  # eps = -L^T s
            return -sde.cholesky(times).transpose(-1, -2).reshape(len(times), -1)
        a, s = sde.alpha(times), sde.sigma(times)
        if self.prediction == "x0":  # eps = (x - a x0) / s
            return torch.stack([1 / s, -a / s], 1)
        return torch.stack([s, a], 1)  # v: eps = s x + a v

    def _to_eps(self, out, z, conv, n):
        if conv is None:
            return out
        c = conv[n]
        if self.prediction == "score":
            if self.sde.dim == 1:
                return c[0] * out
            h = out.shape[1] // 2
            sx, sm = out[:, :h], out[:, h:]
            return torch.cat([c[0] * sx + c[1] * sm, c[2] * sx + c[3] * sm], 1)
        return c[0] * z + c[1] * out

    # ---- the loop ------------------------------------------------------------------
    def _check_state(self, zT):
        if not isinstance(zT, torch.Tensor):
            raise TypeError(f"zT must be a torch.Tensor, got {type(zT).__name__}")
        if zT.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"zT must be float32, float16 or bfloat16, got {zT.dtype}")
        if zT.ndim < 2:
            raise ValueError(f"zT must be a batch [B, C, ...], got shape {tuple(zT.shape)}")
        if self.sde.dim == 2 and zT.shape[1] % 2:
            raise ValueError(
                f"zT has {zT.shape[1]} channels; an augmented process needs the full state [B, 2C, ...] "
                "(use sde.prior_sample(data_shape))"
            )

    def philox_key(self, generator=None, device="cpu"):
        """The Philox key as an int64 [1] tensor on ``device``, drawn from ``generator``
        (default: the device's default generator) without any host read. The kernels read it
        on the device, so a CUDA graph captured around sample() with a CUDA generator draws a
        new key, and new noise, on every replay; torch.compile sees a tensor, not a constant.
        None for methods without noise or with noise="torch". (torch.compile cannot trace a
        torch.Generator argument: to compile with one, draw the key outside and compile run().)"""
        if not self.info.stochastic or self.noise != "philox":
            return None
        gdev = generator.device if generator is not None else torch.device(device)
        key = torch.randint(0, 2**62, (1,), generator=generator, device=gdev, dtype=torch.int64)
        return key.to(device)

    @torch.no_grad()
    def sample(self, model, zT, generator=None, return_state=False, progress=False, callback=None):
        """Integrate from the prior draw zT (time T) to the data, with exactly `nfe` model calls.

        Returns the data part (x) of the final state, or the whole state with
        return_state=True. `callback(dict(step, t, z, eps))` is called after each step.
        Runs without autograd: the fused step has no derivative formula.
        """
        if not callable(model):
            raise TypeError(f"model must be callable as model(z, t), got {type(model).__name__}")
        self._check_state(zT)
        coef, times, conv = self._device_tables(zT.device)
        seed = self.philox_key(generator, zT.device)
        z = self.run(model, zT, coef, times, conv, seed, generator, progress, callback)
        return z if return_state else self.sde.data_part(z)

    def run(self, model, z, coef, times, conv, seed=None, generator=None, progress=False, callback=None):
        """The loop proper: no host sync, no branch on tensor values. ``seed``: the Philox key,
        an int64 [1] tensor on z's device (or an int, turned into one here)."""
        dim = self.sde.dim
        if isinstance(seed, int) and not isinstance(seed, bool):
            seed = torch.tensor([seed], dtype=torch.int64, device=z.device)
        hist = []
        per_step = z.numel() // dim
        rows = coef.shape[0]
        for n in _progress(range(rows), progress, f"fastint {self.method}"):
            noise = None
            if self.info.stochastic and self.noise == "torch":
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=torch.float32)
            if not self._calls[n]:  # a map with no model call (its Q is zero): the eps slot gets z
                z = fused_step(z, [z], coef, n, dim, noise=noise, offset=n * per_step, seed_tensor=seed)
                continue
            t = times[n].expand(z.shape[0])
            out = model(z, t)
            if not isinstance(out, torch.Tensor) or out.shape != z.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"model output must have the state's shape {tuple(z.shape)}, got {got}")
            eps = self._to_eps(out, z, conv, n).to(z.dtype)
            hist = [eps] + hist[: self.info.history - 1]
            z = fused_step(z, hist, coef, n, dim, noise=noise, offset=n * per_step, seed_tensor=seed)
            if callback is not None:
                callback({"step": n, "t": times[n], "z": z, "eps": eps})
        return z


def sample(model, sde, zT, method="ddim", nfe=50, generator=None, return_state=False, progress=False, **options):
    """Functional form: `Sampler(sde, method, nfe, **options).sample(model, zT, ...)`."""
    return Sampler(sde, method=method, nfe=nfe, **options).sample(
        model, zT, generator=generator, return_state=return_state, progress=progress
    )
