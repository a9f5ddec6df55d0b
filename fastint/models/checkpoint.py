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
    """The process described by a process_spec dict."""
    name = spec["name"]
    if name not in _PROCESS_PARAMS:
        raise ValueError(f"unknown process {name!r} in checkpoint; expected one of {sorted(_PROCESS_PARAMS)}")
    return getattr(_processes, name)(**spec["params"])


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


def build_model(ckpt, state_key="state_dict"):
    """Rebuild the network of a checkpoint dict and load its weights (float32, eval mode)."""
    arch = ckpt.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"checkpoint arch must be one of {sorted(ARCHS)}, got {arch!r}")
    try:
        model = ARCHS[arch](**ckpt["config"])
    except TypeError as e:
        raise ValueError(f"checkpoint config does not fit {arch}: {e}") from e
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt[state_key].items()}
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(want[k].shape)}"
             for k in want if k in state and state[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint weights do not match {arch}(**config): "
                         + "; ".join(filter(None, [f"missing {missing[:3]}" if missing else "",
                                                   f"unexpected {unexpected[:3]}" if unexpected else "",
                                                   f"shape mismatch {wrong[:3]}" if wrong else ""])))
    model.load_state_dict(state)
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
        got = None if ckpt.get("data") is None else tuple(ckpt["data"]["shape"])
        if got != tuple(int(s) for s in data_shape):
            raise ValueError(f"checkpoint was trained on data of shape {got}, not data_shape {tuple(data_shape)}")
    model = build_model(ckpt)
    if sde is not None and ckpt.get("data") is not None:
        need = sde.dim * ckpt["data"]["shape"][0]
        if model.in_channels != need:
            raise ValueError(f"checkpoint model has {model.in_channels} input channels, but {type(sde).__name__} on "
                             f"data of shape {tuple(ckpt['data']['shape'])} needs {need}")
    return Loaded(model, sde, ckpt)


def load_pretrained(name="psld"):
    """A shipped model: "psld" / "vp" / "flow" (ContinuousUNets on digits) or "classifier" -> Loaded."""
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {sorted(PRETRAINED)}, got {name!r}")
    return load_checkpoint(name)
