"""The sampling loop: one model call, then one fused step op, per table row.

Everything numerical is precomputed: the integrator is a float64 table built once
(fastint.coefficients), copied to the sampling device in float32, and applied row by row
by torch.ops.fastint.step. The loop itself never reads a tensor value on the host, so it
can be captured by torch.compile(fullgraph=True) and by CUDA graphs.
"""
import torch

from . import grids
from .checks import is_int
from .flow import FLOW_METHODS, PREDICTIONS_FLOW, FlowMatch, flow_grid, flow_table
from .methods import METHODS, check_method
from .processes import VPSDE
from .table import MAX_COEF, _capturing, check_finite as _check_finite, check_table, make_table, run, table_dtype

PREDICTIONS_VP = ("eps", "score", "x0", "v")
PREDICTIONS_AUG = ("eps", "score")
NOISE_SOURCES = ("philox", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_NFE = 100_000  # model calls per sample: far beyond any sampler's use, with a table that fits in memory


class Sampler:
    """A configured integrator for one process: `Sampler(sde, method, nfe, ...).sample(model, zT)`.

    Args:
        sde: a fastint process (VPSDE, PSLD, CLD, FlowMatch).
        method: integrator name, one of fastint.METHODS (FlowMatch: euler, ddim, conj_ms, sddim).
        nfe: exact number of model calls per sample (default 50 on a named grid).
        grid: a named time grid (fastint.grids.GRIDS: uniform, quadratic, logsnr, edm/karras,
            exponential, beta) or an explicit decreasing sequence of times in (0, T]: the model
            times, then the final time (with denoise=True the last time is also the Tweedie
            call's); then nfe follows from its length. FlowMatch: named grids are in sigma
            (fastint.flow.flow_grid, shifted by sde.shift), an explicit grid is a sequence of
            sigmas in (0, 1] and may end with 0 (the last step then maps to x̂0: denoise).
        t_eps: the smallest time reached by a named grid, in (0, T) (default 1e-3). FlowMatch's
            named grids are spaced in the unshifted time, so they end at σ = shift(t_eps)
            (fastint.flow.flow_grid; ``grid_times[-1]`` is the time reached).
        denoise: if True the last model call maps t_eps to the posterior mean (Tweedie);
            it is one of the `nfe` calls.
        prediction: what the model returns: "eps" (default), "score", or (VP only) "x0" / "v";
            FlowMatch: "flow" (default, the velocity v = ε − x0) or "x0".
        noise: for stochastic methods, "philox" (normals made inside the kernel from a
            seed drawn from the generator) or "torch" (torch.randn with the generator,
            for bitwise parity with torch-based pipelines).
        **options: the method's options (fastint.METHODS[method].options), e.g.
            `lam=0.5, b="ones"` for lambda_ddim, `eta=0.3` for sddim, `k=3` for conj_ms;
            unset options take the method's defaults (for lambda_ddim, lam and b tuned per
            process and NFE: fastint.tuning, docs/tuning.md).
    """

    def __init__(self, sde, method="ddim", nfe=None, grid="quadratic", t_eps=None, denoise=True,
                 prediction=None, noise="philox", **options):
        if isinstance(sde, type):
            raise TypeError(f"sde must be a process instance, such as {sde.__name__}(), got the class {sde.__name__}")
        flow = isinstance(sde, FlowMatch)
        if flow:
            if not isinstance(method, str) or method not in FLOW_METHODS:
                raise ValueError(f"method must be one of {list(FLOW_METHODS)} for FlowMatch, got {method!r}")
            info = METHODS[method]
            if not isinstance(grid, str) and getattr(grid, "ndim", 1) == 1 and len(grid) > 1 and float(grid[-1]) == 0.0:
                if denoise is False:
                    raise ValueError("grid ends with sigma = 0, a last step to x̂0, which is denoise=True: pass "
                                     "denoise=True, or end the grid at the last sigma with denoise=False")
                grid, denoise = grid[:-1], True  # a last step to sigma = 0 is the x0 row
        else:
            info = check_method(sde, method)
        if nfe is not None and not is_int(nfe):
            raise TypeError(f"nfe must be an int, got {type(nfe).__name__}")
        if nfe is not None and not 1 <= nfe <= MAX_NFE:
            raise ValueError(f"nfe must lie in [1, {MAX_NFE}], got {nfe}")
        if not isinstance(denoise, bool):
            raise TypeError(f"denoise must be a bool, got {type(denoise).__name__}")
        per, extra = info.calls_per_step, int(denoise)
        if isinstance(grid, str):
            nfe = 50 if nfe is None else int(nfe)
            n_steps = (nfe - extra) // per
            if n_steps < 1 or n_steps * per + extra != nfe:
                raise ValueError(
                    f"nfe={nfe} does not fit method {method!r} ({per} call(s) per step"
                    f"{', plus 1 denoising call' if denoise else ''}): at least 1 step is needed"
                )
            t_eps = 1e-3 if t_eps is None else t_eps
            times = (flow_grid if flow else grids.make)(sde, grid, n_steps, t_eps)
        else:  # explicit times: the model times, then the final time (with denoise, the last model time)
            if t_eps is not None:
                raise TypeError("t_eps is set by an explicit grid (its last time); do not pass both")
            times = grids.as_times(sde, grid, name="grid")
            n_steps = times.numel() - 1
            if nfe is not None and nfe != n_steps * per + extra:
                raise ValueError(f"nfe={nfe} does not match grid: {times.numel()} times give "
                                 f"{n_steps * per + extra} model calls with method {method!r}")
            nfe = n_steps * per + extra
            if n_steps < 1 and not (denoise and info.prologue == 0):
                raise ValueError("grid must hold at least 2 times (one step), or one time with denoise=True")
            t_eps = float(times[-1])
        allowed = PREDICTIONS_FLOW if flow else PREDICTIONS_VP if isinstance(sde, VPSDE) else PREDICTIONS_AUG
        prediction = allowed[0] if prediction is None else prediction
        if prediction not in allowed:
            raise ValueError(f"prediction must be one of {allowed} for {type(sde).__name__}, got {prediction!r}")
        if noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
        self.sde, self.method, self.nfe = sde, method, nfe
        self.grid = grid if isinstance(grid, str) else "explicit"
        self.t_eps, self.denoise, self.prediction, self.noise = float(t_eps), denoise, prediction, noise
        self.info = info
        self.n_steps = n_steps
        self.options = dict(options)
        self.grid_times = times
        if flow:
            self.tab = flow_table(times, method, denoise=denoise, **options)
        else:
            self.tab = make_table(sde, method, times, denoise=denoise, **options)
        # float32 sampling on the process's own states: no coefficient beyond float32's precision
        # (raised when a float32/16 state meets the table, device_table; float64 states are fine)
        try:
            check_table(self.tab.coef, f"{sde!r} with method {method!r}, nfe={nfe} and options {options}",
                        max_coef=MAX_COEF)
            self._float32_error = None
        except ValueError as e:
            self._float32_error = str(e)
        # copies: the Table is cached and shared by every sampler with the same key
        self.table, self.times = self.tab.coef.clone(), self.tab.times.clone()
        self._conv = {}
        # float64 rows turning the model's output into ε (or x̂0), made here, not in device_table:
        # the process's checked schedule functions must not be traced by torch.compile
        self._conv64 = self._prediction_coefficients(torch.nan_to_num(self.times, nan=self.sde.T))
        self._buffers = None  # (key, [tensors]): the loop's buffers for the last state layout

    def __repr__(self):
        process = repr(self.sde) if isinstance(self.sde, FlowMatch) else type(self.sde).__name__  # its shift
        return (f"Sampler({process}, method={self.method!r}, nfe={self.nfe}, grid={self.grid!r}, "
                f"t_eps={self.t_eps}, denoise={self.denoise}, prediction={self.prediction!r}"
                + "".join(f", {k}={v!r}" for k, v in self.options.items()) + ")")

    # ---- device copies, made once per device ----------------------------------------
    def device_table(self, device, dtype=torch.float32):
        """(DeviceTable, prediction-conversion rows or None) on ``device`` for states of ``dtype``
        (float32 coefficients; float64 for float64 states), made once."""
        cdt = table_dtype(dtype)
        if cdt == torch.float32 and self._float32_error is not None:
            raise ValueError(self._float32_error + " (float64 states can use this table)")
        key = (str(torch.device(device)), cdt)
        if key not in self._conv:
            conv = self._conv64
            self._conv[key] = None if conv is None else conv.to(device=device, dtype=cdt)
        return self.tab.to(device, cdt), self._conv[key]

    def _prediction_coefficients(self, times):
        """Per-row float64 coefficients turning the model's output into what the table reads (ε;
        for FlowMatch x̂0)."""
        sde = self.sde
        if isinstance(sde, FlowMatch):  # flow tables read x̂0: x − σ v (prediction "flow") or x0 itself
            return torch.stack([torch.ones_like(times), -times], 1) if self.prediction == "flow" else None
        if self.prediction == "eps":
            return None
        if self.prediction == "score":  # eps = -L^T s
            return -sde.cholesky(times).transpose(-1, -2).reshape(len(times), -1)
        a, s = sde.alpha(times), sde.sigma(times)
        if self.prediction == "x0":  # eps = (x - a x0) / s
            return torch.stack([1 / s, -a / s], 1)
        return torch.stack([s, a], 1)  # v: eps = s x + a v

    def _to_eps(self, out, z, conv, n, buf=None):
        """The model output as ε (row n's conversion coefficients ``conv[n]``). ``buf``: a tensor
        like z to write it into (the loop's conversion ring: no allocation per step)."""
        if conv is None:
            return out
        c = conv[n]
        if buf is not None:
            if self.prediction == "score":
                if self.sde.dim == 1:
                    return torch.mul(out, c[0], out=buf)
                h = out.shape[1] // 2
                sx, sm, bx, bm = out[:, :h], out[:, h:], buf[:, :h], buf[:, h:]
                # halves of buf are strided views: in-place ops, not out= (which dynamo refuses there)
                bx.copy_(sx).mul_(c[0]).addcmul_(sm, c[1])
                bm.copy_(sx).mul_(c[2]).addcmul_(sm, c[3])
                return buf
            return torch.mul(z, c[0], out=buf).addcmul_(out, c[1])
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
            raise TypeError(f"zT must be float32, float16, bfloat16 or float64, got {zT.dtype}")
        if zT.ndim < 1 or (zT.ndim == 1 and self.sde.dim == 2):
            raise ValueError(f"zT must be a batch [B, C, ...]{' (or [B] of scalars)' if self.sde.dim == 1 else ''}, "
                             f"got shape {tuple(zT.shape)}")
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
        _check_generator_callback(generator, None)
        if not self.info.stochastic or self.noise != "philox":
            return None
        gdev = generator.device if generator is not None else torch.device(device)
        key = torch.randint(0, 2**62, (1,), generator=generator, device=gdev, dtype=torch.int64)
        return key.to(device)

    def free_buffers(self):
        """Drop the loop buffers kept between calls (a few tensors like the last zT)."""
        self._buffers = None

    def _loop_buffers(self, z):
        """The loop's buffers for z's layout, kept between eager calls (none while torch.compile
        traces or a CUDA graph captures: those own their memory)."""
        if _capturing():
            return None
        key = (tuple(z.shape), z.stride(), z.dtype, z.device)
        if self._buffers is None or self._buffers[0] != key:
            self._buffers = (key, [])
        return self._buffers[1]

    @torch.no_grad()
    def sample(self, model, zT, generator=None, return_state=False, progress=False, callback=None,
               check_finite=True, seed=None, first_index=0, out=None):
        """Integrate from the prior draw zT (time T) to the data, with exactly `nfe` model calls.

        Returns the data part (x) of the final state, or the whole state with
        return_state=True. `callback(dict(step, t, z, eps))` is called after each step.
        Runs without autograd: the fused step has no derivative formula. ``check_finite``: raise
        FloatingPointError if the result holds NaN/Inf (one host read after the loop; skipped
        while torch.compile traces or a CUDA graph captures). ``seed`` (an int Philox key, e.g.
        fastint.seeding.philox_key(s)) replaces the key drawn from ``generator``; with
        ``first_index`` (the global index of zT's first sample) each sample's noise then depends
        only on (seed, its index), not on the batch (docs/design.md, "Per-sample determinism").
        ``out``: a tensor like zT that receives the final state (then nothing of zT's size is
        allocated: the loop's buffers are kept between calls, see free_buffers).
        """
        if not callable(model):
            raise TypeError(f"model must be callable as model(z, t), got {type(model).__name__}")
        _check_generator_callback(generator, callback)
        self._check_state(zT)
        if zT.ndim == 1:  # a batch of scalars: the op works on [B, 1]; the model sees [B]
            inner = model
            model = lambda z, t: _as_column(inner(z[:, 0], t))  # noqa: E731
            zT = zT[:, None]
            res = self.sample(model, zT, generator, return_state, progress, callback, check_finite, seed,
                              first_index, None if out is None else out[:, None])
            return res[:, 0]
        table, conv = self.device_table(zT.device, zT.dtype)
        if seed is None:
            seed = self.philox_key(generator, zT.device)
        elif self.noise == "torch" and self.info.stochastic:
            raise ValueError("seed (a Philox key) needs noise='philox'; noise='torch' draws from the generator")
        z = self.run(model, zT, table, conv, seed, generator, progress, callback, first_index, out=out)
        if check_finite:
            _check_finite(z, f"Sampler({self.method!r}, nfe={self.nfe})",
                          hint="check the model and its inputs; check_finite=False skips this check")
        return z if return_state else self.sde.data_part(z)

    @torch.no_grad()
    def run(self, model, z, table, conv=None, seed=None, generator=None, progress=False, callback=None,
            first_index=0, out=None):
        """The loop proper (fastint.table.run): no host sync, no branch on tensor values.
        ``table``, ``conv``: from device_table(z.device); ``seed``: the Philox key, an int64 [1]
        tensor on z's device (or an int, turned into one here); ``first_index``: the global
        index of z's first sample (its Philox counters)."""
        _check_generator_callback(generator, callback)
        if seed is not None and not isinstance(seed, torch.Tensor):
            if not is_int(seed) or not 0 <= seed < 2**63:
                raise TypeError(f"seed must be an int Philox key in [0, 2**63) or an int64 [1] tensor, got {seed!r}")
            seed = torch.tensor([int(seed)], dtype=torch.int64, device=z.device)
        if self.info.stochastic and seed is None and self.noise == "philox":
            raise ValueError(f"method {self.method!r} is stochastic: run needs the Philox key seed "
                             "(Sampler.philox_key(generator, device))")

        # A non-ε model's output is converted into a ring of buffers made once: the history holds
        # up to table.history of them, plus the one being written. A callback may keep each ε, so
        # with one every conversion is a new tensor (same arithmetic), as it is when the output's
        # dtype is not z's.
        ring = ([torch.empty_like(z) for _ in range(table.history + 1)]
                if conv is not None and callback is None else None)
        calls = [0]

        def eps_of(z, n):
            out = model(z, table.times[n].expand(z.shape[0]))
            if not isinstance(out, torch.Tensor) or out.shape != z.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"model output must have the state's shape {tuple(z.shape)}, got {got}")
            if not out.is_floating_point():  # an int output would be cast, a complex one lose its imaginary part
                raise TypeError(f"model output must be a floating-point tensor, got {out.dtype}")
            if conv is not None and out.dtype == z.dtype:  # the same arithmetic with and without the ring
                buf = torch.empty_like(z) if ring is None else ring[calls[0] % len(ring)]
                calls[0] += 1
                return self._to_eps(out, z, conv, n, buf)
            return self._to_eps(out, z, conv, n).to(z.dtype)

        noise_of = None
        if self.info.stochastic and self.noise == "torch":
            # torch.randn from the generator (parity with torch pipelines), drawn into one buffer:
            # randn is empty(...).normal_(), so the values are the same
            noise_buf = torch.empty(z.shape, device=z.device, dtype=torch.float32)
            noise_of = lambda n: noise_buf.normal_(generator=generator)  # noqa: E731

        return run(table, eps_of, z, noise_of, seed, progress, callback, desc=f"fastint {self.method}",
                   first_index=first_index, buffers=self._loop_buffers(z), out=out)


def _check_generator_callback(generator, callback):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(dict) or None, got {type(callback).__name__}")


def _as_column(out):
    return out[:, None] if isinstance(out, torch.Tensor) and out.ndim == 1 else out


def sample(model, sde, zT, method="ddim", nfe=None, generator=None, return_state=False, progress=False, **options):
    """Functional form: `Sampler(sde, method, nfe, **options).sample(model, zT, ...)`."""
    return Sampler(sde, method=method, nfe=nfe, **options).sample(
        model, zT, generator=generator, return_state=return_state, progress=progress
    )
