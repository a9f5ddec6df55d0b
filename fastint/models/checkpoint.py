"""Checkpoints that carry everything needed to rebuild and validate a model.

A checkpoint is a dict saved with torch.save and read back with weights_only=True:

    format      "fastint.checkpoint/1"
    arch        "ContinuousUNet" | "UNet" | "DigitClassifier"
    config      the constructor arguments (architecture hyperparameters)
    process     {"name": "PSLD", "params": {...}}  (denoisers; None for the classifier)
    data        {"name": "digits", "shape": [1, 8, 8], "range": [-1, 1]}
    prediction  "eps"
    state_dict  the (EMA) weights, float16 when saved with half=True
    meta        free-form record: training steps, batch, seconds, command, ...

Loading rebuilds the model, checks the process and data shape against what the caller
expects, and raises ValueError naming the mismatch (instead of a size-mismatch traceback).
"""
import os
from collections import namedtuple
from importlib import resources

import torch

from .. import processes as _processes
from .classifier import DigitClassifier
from .continuous_unet import ContinuousUNet
from .unet import UNet

FORMAT = "fastint.checkpoint/1"
ARCHS = {"ContinuousUNet": ContinuousUNet, "UNet": UNet, "DigitClassifier": DigitClassifier}
PROCESS_NAMES = {"vp": "VPSDE", "psld": "PSLD", "cld": "CLD"}
_PROCESS_PARAMS = {
    "VPSDE": ("beta_min", "beta_max", "T"),
    "PSLD": ("gamma", "nu", "m_inv", "beta_min", "beta_max", "kappa", "T", "jitter"),
    "CLD": ("nu", "m_inv", "beta_min", "beta_max", "kappa", "T", "jitter"),
}
# The checkpoints shipped in fastint/checkpoints (how to reproduce them: docs/models.md).
PRETRAINED = {
    "psld": "cunet_psld_digits.pt",
    "vp": "cunet_vp_digits.pt",
    "flow": "cunet_flow_digits.pt",  # velocity model of the flow-matching path (sde None: use fastint.FlowMatch)
    "classifier": "classifier_digits.pt",
}

Loaded = namedtuple("Loaded", ["model", "sde", "checkpoint"])


def process_spec(sde):
    """{"name", "params"} of a fastint process, enough to rebuild it."""
    name = type(sde).__name__
    if name not in _PROCESS_PARAMS:
        raise TypeError(f"sde must be a fastint VPSDE, PSLD or CLD, got {name}")
    if name == "VPSDE" and sde.alphas_cumprod is not None:
        raise ValueError("checkpoints support the linear-beta VPSDE only, not a discrete alphas_cumprod schedule")
    return {"name": name, "params": {k: float(getattr(sde, k)) for k in _PROCESS_PARAMS[name]}}


def build_process(spec):
    """The process described by a process_spec dict; ValueError / TypeError naming what is wrong
    (an unknown process, a missing or unknown parameter, a value its constructor refuses)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("params"), dict):
        raise ValueError(f"checkpoint process must be a dict {{'name': ..., 'params': {{...}}}}, got {spec!r:.80}")
    name = spec.get("name")
    if name not in _PROCESS_PARAMS:
        raise ValueError(f"unknown process {name!r} in checkpoint; expected one of {sorted(_PROCESS_PARAMS)}")
    params = spec["params"]
    unknown = sorted(map(str, set(params) - set(_PROCESS_PARAMS[name])))
    missing = sorted(set(_PROCESS_PARAMS[name]) - set(params))
    if unknown or missing:
        raise ValueError(f"checkpoint process {name} parameters must be {list(_PROCESS_PARAMS[name])}: "
                         + "; ".join(filter(None, [f"unknown {unknown}" if unknown else "",
                                                   f"missing {missing}" if missing else ""])))
    try:
        return getattr(_processes, name)(**params)
    except (ValueError, TypeError) as e:
        raise type(e)(f"checkpoint process {name}: {e}") from None


def _as_process(process):
    if isinstance(process, str):
        key = process.lower()
        if key not in PROCESS_NAMES:
            raise ValueError(f"process must be one of {sorted(PROCESS_NAMES)} or a fastint process, got {process!r}")
        return getattr(_processes, PROCESS_NAMES[key])()
    process_spec(process)  # type check
    return process


def make_checkpoint(model, sde=None, data_shape=None, data_name="digits", meta=None, half=False):
    """The checkpoint dict of `model` (for the process `sde` if it is a denoiser)."""
    arch = getattr(model, "arch", None)
    if arch not in ARCHS:
        raise TypeError(f"model must be one of {sorted(ARCHS)}, got {type(model).__name__}")
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    ckpt = {"format": FORMAT, "arch": arch, "config": dict(model.config),
            "process": None if sde is None else process_spec(sde),
            "data": None if data_shape is None else {"name": data_name, "shape": [int(s) for s in data_shape],
                                                     "range": [-1.0, 1.0]},
            "prediction": "eps" if sde is not None else None, "state_dict": state, "meta": dict(meta or {})}
    if sde is not None and data_shape is not None and model.config["in_channels"] != sde.dim * data_shape[0]:
        raise ValueError(f"model has {model.config['in_channels']} input channels, but {type(sde).__name__} on data "
                         f"with {data_shape[0]} channel(s) needs {sde.dim * data_shape[0]}")
    return ckpt


def save_checkpoint(path, model, sde=None, data_shape=None, meta=None, half=False, **extra):
    """Write make_checkpoint(...) plus any `extra` entries (e.g. optimizer state) to `path`."""
    ckpt = make_checkpoint(model, sde, data_shape, meta=meta, half=half)
    ckpt.update(extra)
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind
    return path


def _read(source, map_location):
    if isinstance(source, dict):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path, a pretrained name or a dict, got {type(source).__name__}")
    path = os.fspath(source)
    if path in PRETRAINED:
        path = str(resources.files("fastint").joinpath("checkpoints", PRETRAINED[path]))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r} (pretrained names: {sorted(PRETRAINED)})")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a fastint checkpoint (format {FORMAT!r})")
    return ckpt


def _check_state(state, state_key):
    """The state dict of a checkpoint: a dict of name -> tensor, or ValueError naming the entry."""
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {state_key} must be a dict of tensors, got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"checkpoint {state_key} entry {k!r} must be a tensor, got {type(v).__name__}")
    return state


def _check_data(data, model, sde):
    """The checkpoint's data record against its model config: shape [C, H, W] of positive ints,
    C·dim = in_channels, and H = W = the config's resolution (a denoiser run on another size
    returns garbage, or runs for minutes on a huge one)."""
    if data is None:
        return
    shape = data.get("shape") if isinstance(data, dict) else None
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                                      for s in shape):
        raise ValueError(f"checkpoint data must be a dict with 'shape', a list of positive ints, got {data!r:.80}")
    res = getattr(model, "config", {}).get("resolution")
    if res is not None and (len(shape) != 3 or shape[1] != res or shape[2] != res):
        raise ValueError(f"checkpoint data shape {list(shape)} disagrees with its config: the model was built for "
                         f"[C, {res}, {res}] (resolution={res})")
    if sde is not None and getattr(model, "in_channels", None) not in (None, sde.dim * shape[0]):
        raise ValueError(f"checkpoint model has {model.in_channels} input channels, but {type(sde).__name__} on "
                         f"data of shape {tuple(shape)} needs {sde.dim * shape[0]}")


def build_model(ckpt, state_key="state_dict", sde=None):
    """Rebuild the network of a checkpoint dict and load its weights (float32, eval mode).

    The config is first built on the meta device (no memory) and its weight shapes compared with
    the checkpoint's own tensors, so a config asking for more than the checkpoint holds (a huge
    ``ch``) is refused before anything is allocated; the data record is checked against the config
    (``_check_data``, with the process ``sde`` if given)."""
    arch = ckpt.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"checkpoint arch must be one of {sorted(ARCHS)}, got {arch!r}")
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint config must be a dict, got {type(config).__name__}")
    raw = _check_state(ckpt.get(state_key), state_key)
    try:
        with torch.device("meta"):
            shell = ARCHS[arch](**config)
    except TypeError as e:
        raise ValueError(f"checkpoint config does not fit {arch}: {e}") from e
    except RuntimeError as e:  # sizes that overflow: "Storage size calculation overflowed"
        raise ValueError(f"checkpoint config of {arch} asks for impossible sizes: {str(e).splitlines()[0]}") from e
    _check_data(ckpt.get("data"), shell, sde)
    want, state = shell.state_dict(), raw
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(want[k].shape)}"
             for k in want if k in state and state[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint weights do not match {arch}(**config): "
                         + "; ".join(filter(None, [f"missing {missing[:3]}" if missing else "",
                                                   f"unexpected {unexpected[:3]}" if unexpected else "",
                                                   f"shape mismatch {wrong[:3]}" if wrong else ""])))
    model = ARCHS[arch](**config)  # its sizes are now those of the checkpoint's own tensors
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in raw.items()})
    return model.eval()


def load_checkpoint(checkpoint, process=None, data_shape=None, arch=None, map_location="cpu"):
    """Load a denoiser or classifier checkpoint -> Loaded(model, sde, checkpoint).

    checkpoint: a path, a pretrained name ("psld", "vp", "classifier") or a checkpoint dict.
    process: the process the caller will sample with ("vp"/"psld"/"cld" or a fastint
        process); ValueError if the checkpoint was trained for another one.
    data_shape: the expected data shape [C, H, W]; ValueError on mismatch.
    arch: the expected architecture name; ValueError on mismatch.
    """
    ckpt = _read(checkpoint, map_location)
    if arch is not None and ckpt.get("arch") != arch:
        raise ValueError(f"checkpoint holds a {ckpt.get('arch')}, not a {arch}")
    sde = None if ckpt.get("process") is None else build_process(ckpt["process"])
    if process is not None:
        want = _as_process(process)
        if sde is None:
            raise ValueError(f"checkpoint holds a {ckpt.get('arch')} with no diffusion process; cannot use it with "
                             f"{want!r}")
        if want.cache_key() != sde.cache_key():
            raise ValueError(f"checkpoint was trained for {sde!r}, not for process {want!r}")
    if data_shape is not None:
        got = tuple(ckpt["data"]["shape"]) if isinstance(ckpt.get("data"), dict) and "shape" in ckpt["data"] else None
        if got != tuple(int(s) for s in data_shape):
            raise ValueError(f"checkpoint was trained on data of shape {got}, not data_shape {tuple(data_shape)}")
    model = build_model(ckpt, sde=sde)
    return Loaded(model, sde, ckpt)


def load_pretrained(name="psld"):
    """A shipped model: "psld" / "vp" / "flow" (ContinuousUNets on digits) or "classifier" -> Loaded."""
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {sorted(PRETRAINED)}, got {name!r}")
    return load_checkpoint(name)
