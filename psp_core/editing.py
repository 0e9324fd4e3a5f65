"""Latent editing in W+: load the direction formats used in the field, apply them, fit new ones.

No Ray here. Formats (all read without unpickling arbitrary objects):

- InterFaceGAN-style linear directions, as shipped by the e4e/ReStyle repositories (``age.pt``,
  ``smile.pt``, ``pose.pt``; ``pose.pt`` is stored on ``cuda:0`` and is mapped to the CPU):
  a tensor ``[1, 512]`` (one offset for every style) or ``[1, n_styles, 512]``. InterFaceGAN's own
  boundaries (``.npy`` ``[1, 512]``) and plain ``.npy`` ``[512]`` / ``[n_styles, 512]`` too.
  Edit: ``w + strength * direction``.
- GANSpace PCA: a dict ``{'mean': [1, 512], 'comp': [k, 1, 512], 'std': [k]}`` (``.pt``, the e4e
  file) or GANSpace's own ``.npz`` (``lat_mean``, ``lat_comp``, ``lat_stdev``), plus an edit
  ``(component, start, end)``. Edit of styles ``start:end`` (a Python slice, as in e4e's tuples)::

      coord = <w[0] - mean, comp[component]> / std[component]     # from the FIRST style's W
      w[start:end] += (strength - coord) * std[component] * comp[component]

  i.e. every style in the range moves by the offset that brings style 0's coordinate along the
  component to ``strength`` standard deviations (e4e's ``ganspace.edit``).

``edit(w_plus, direction, strength)`` is batched and exact for linear directions: the result equals
``w + s * d`` computed in float32 (the product, then the sum; no fused multiply-add).
``fit_direction(w_plus, labels)`` fits a unit direction from labelled latents.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from psp_core.uris import is_local, open_uri

__all__ = [
    "Direction",
    "DirectionError",
    "LatentDecoder",
    "edit",
    "fit_direction",
    "load_decoder",
    "load_direction",
]

STYLE_DIM = 512


class DirectionError(ValueError):
    """A direction file or edit that cannot be used as asked; the message says what to do."""


@dataclass(frozen=True, eq=False)
class Direction:
    """A latent edit direction.

    kind: ``"linear"`` (``vector`` is ``[512]`` -- the same offset for every style -- or
    ``[n_styles, 512]``; float32) or ``"ganspace"`` (``mean [512]``, ``comp [k, 512]``,
    ``std [k]`` and the edit ``component``, ``start``, ``end``; ``end`` None means all styles).
    name: what output rows record (by default the file's stem, plus the GANSpace edit).
    sha256: of the file the direction came from (None when built in memory).
    """

    name: str
    kind: str
    vector: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    comp: torch.Tensor | None = None
    std: torch.Tensor | None = None
    component: int | None = None
    start: int = 0
    end: int | None = None
    sha256: str | None = None
    source: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.kind == "linear":
            if self.vector is None or self.vector.ndim not in (1, 2) or self.vector.shape[-1] != STYLE_DIM:
                shape = None if self.vector is None else tuple(self.vector.shape)
                raise DirectionError(f"direction {self.name!r}: a linear vector is [512] or [n_styles, 512], got {shape}")
        elif self.kind == "ganspace":
            if self.mean is None or self.comp is None or self.std is None or self.component is None:
                raise DirectionError(f"direction {self.name!r}: a GANSpace edit needs mean, comp, std and component")
            k = self.comp.shape[0]
            if not 0 <= self.component < k:
                raise DirectionError(
                    f"direction {self.name!r}: component {self.component} is outside the PCA's 0..{k - 1}"
                )
        else:
            raise DirectionError(f"direction kind {self.kind!r}: expected 'linear' or 'ganspace'")

    @property
    def n_styles(self) -> int | None:
        """Styles the direction is made for (None: any, one offset shared by every style)."""
        if self.kind == "linear" and self.vector.ndim == 2:
            return int(self.vector.shape[0])
        return None

    def check(self, n_styles: int) -> None:
        """Raise DirectionError unless the direction applies to W+ with ``n_styles`` styles."""
        if self.n_styles is not None and self.n_styles != n_styles:
            raise DirectionError(
                f"direction {self.name!r} has {self.n_styles} styles but the latents have {n_styles} "
                f"(a {2 ** ((n_styles + 2) // 2)}px generator): use a direction made for this generator, "
                "or a [512] one that applies to every style"
            )
        if self.kind == "ganspace":
            end = n_styles if self.end is None else self.end
            if not 0 <= self.start < end <= n_styles:
                raise DirectionError(
                    f"direction {self.name!r}: GANSpace styles {self.start}:{self.end} are outside the "
                    f"latents' 0:{n_styles} (start < end <= {n_styles}; end is exclusive, as in e4e's tuples)"
                )


# ---------------------------------------------------------------------------------------------
# Loading


def _file_bytes(path: str, storage_options: Mapping[str, Any] | None) -> bytes:
    if not is_local(path):
        with open_uri(path, "rb", storage_options) as f:
            return f.read()
    local = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.exists(local):
        raise FileNotFoundError(f"direction file {path!r} does not exist")
    with open(local, "rb") as f:
        return f.read()


def _as_float_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.array(value, dtype=np.float32))
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise DirectionError(f"{what}: expected a float tensor or array, got {type(value).__name__}")
    return value.detach().to("cpu", torch.float32).contiguous()


def _linear_vector(t: torch.Tensor, name: str) -> torch.Tensor:
    """[512] | [1, 512] | [n, 512] | [1, n, 512] -> [512] or [n, 512]."""
    shape = tuple(t.shape)
    if t.ndim == 3 and shape[0] == 1:
        t = t[0]
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.shape[-1] != STYLE_DIM or t.ndim not in (1, 2):
        raise DirectionError(
            f"direction {name!r} has shape {list(shape)}: a linear direction is [512], [1, 512] (one offset "
            "for every style), [n_styles, 512] or [1, n_styles, 512]"
        )
    return t.contiguous()


def _ganspace(
    parts: Mapping[str, Any], name: str, edit: tuple[int, int, int | None] | None, sha: str, source: str
) -> Direction:
    if edit is None:
        raise DirectionError(
            f"direction {name!r} is a GANSpace PCA (mean, comp, std): say which edit to make, "
            "(component, start, end) -- on the command line --ganspace-edit COMPONENT,START,END, "
            "e.g. 54,7,8 for e4e's eye openness"
        )
    mean = _as_float_tensor(parts["mean"], f"{name}: mean").reshape(-1)
    comp = _as_float_tensor(parts["comp"], f"{name}: comp")
    std = _as_float_tensor(parts["std"], f"{name}: std").reshape(-1)
    if mean.numel() != STYLE_DIM or comp.ndim < 2 or comp[0].numel() != STYLE_DIM or std.numel() != comp.shape[0]:
        raise DirectionError(
            f"direction {name!r}: GANSpace shapes mean {list(parts['mean'].shape)}, comp {list(parts['comp'].shape)}, "
            f"std {list(parts['std'].shape)}; expected mean [1, 512], comp [k, 1, 512], std [k]"
        )
    component, start, end = (int(edit[0]), int(edit[1]), None if edit[2] is None else int(edit[2]))
    return Direction(
        name=f"{name}[{component},{start}:{'' if end is None else end}]",
        kind="ganspace",
        mean=mean,
        comp=comp.reshape(comp.shape[0], STYLE_DIM),
        std=std,
        component=component,
        start=start,
        end=end,
        sha256=sha,
        source=source,
    )


_GANSPACE_KEYS = (("mean", "comp", "std"), ("lat_mean", "lat_comp", "lat_stdev"))


def _ganspace_parts(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    for keys in _GANSPACE_KEYS:
        if all(k in obj for k in keys):
            return dict(zip(("mean", "comp", "std"), (obj[k] for k in keys)))
    return None


def load_direction(
    path: str | os.PathLike,
    ganspace_edit: Sequence[int | None] | None = None,
    name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Direction:
    """Read an edit direction from a ``.pt``/``.pth`` (torch, ``weights_only=True``, mapped to the CPU),
    ``.npy`` or ``.npz`` (``allow_pickle=False``) file, local or any fsspec URI.

    Args:
        ganspace_edit: ``(component, start, end)`` for a GANSpace PCA file (end exclusive; None: to
            the last style). Ignored... no: refused for a linear direction, so a typo cannot pass.
        name: recorded on output rows (default: the file name without extension; GANSpace adds the edit).

    Returns a :class:`Direction` (float32 on the CPU).
    """
    uri = os.fspath(path)
    data = _file_bytes(uri, storage_options)
    sha = hashlib.sha256(data).hexdigest()
    base = os.path.basename(uri.rstrip("/"))
    stem = name or (base.rsplit(".", 1)[0] if "." in base else base)
    obj: Any
    if data[:6] == b"\x93NUMPY":
        obj = np.load(io.BytesIO(data), allow_pickle=False)
    elif data[:4] == b"PK\x03\x04" and _is_npz(data):
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            obj = {k: z[k] for k in z.files}
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise DirectionError(
                f"direction {uri!r} holds Python objects that weights_only=True refuses ({str(e).splitlines()[0]}); "
                "re-save it as a plain tensor or a dict of tensors (torch.save(direction_tensor, path))"
            ) from None
        except Exception as e:
            raise DirectionError(
                f"direction {uri!r} is not a .pt/.npy/.npz file ({type(e).__name__}: {e})"
            ) from None
    if isinstance(obj, Mapping):
        parts = _ganspace_parts(obj)
        if parts is not None:
            return _ganspace(parts, stem, None if ganspace_edit is None else tuple(ganspace_edit), sha, uri)
        tensors = [k for k, v in obj.items() if isinstance(v, (torch.Tensor, np.ndarray))]
        if len(tensors) == 1:  # a dict holding just the direction (e.g. {'direction': tensor})
            obj = obj[tensors[0]]
        else:
            raise DirectionError(
                f"direction {uri!r} is a dict with keys {sorted(map(str, obj))[:8]}: expected a tensor, or a "
                "GANSpace PCA with mean/comp/std (or GANSpace's lat_mean/lat_comp/lat_stdev)"
            )
    if ganspace_edit is not None:
        raise DirectionError(
            f"direction {uri!r} is a linear direction, not a GANSpace PCA: drop --ganspace-edit"
        )
    vector = _linear_vector(_as_float_tensor(obj, f"direction {uri!r}"), uri)
    return Direction(name=stem, kind="linear", vector=vector, sha256=sha, source=uri)


def _is_npz(data: bytes) -> bool:
    """A zip of ``*.npy`` members (numpy's .npz), as opposed to torch's zip format."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


# ---------------------------------------------------------------------------------------------
# Editing


def _ganspace_delta(w: torch.Tensor, d: Direction, strength: torch.Tensor) -> torch.Tensor:
    """[B, n, 512] W+ -> the [B, 512] offset GANSpace adds to styles start:end (see module doc)."""
    c = d.component
    comp = d.comp[c].to(w)
    std = d.std[c].to(w)
    coord = ((w[:, 0] - d.mean.to(w)) * comp).sum(dim=1) / std  # [B]
    return (strength - coord)[:, None] * comp[None] * std


def edit(
    w_plus: torch.Tensor | np.ndarray,
    direction: Direction | torch.Tensor | np.ndarray,
    strength: float | Sequence[float] | np.ndarray | torch.Tensor,
) -> torch.Tensor | np.ndarray:
    """Apply ``direction`` to latents with ``strength``.

    Args:
        w_plus: ``[B, n_styles, 512]`` (or one latent ``[n_styles, 512]``), torch or numpy.
        direction: a :class:`Direction`, or a linear vector ``[512]`` / ``[n_styles, 512]``.
        strength: one float for every row, or ``B`` floats (one per row). Taken as float32.

    Returns:
        edited W+ of the same shape and kind (torch stays on its device; numpy in, numpy out),
        float32. Linear: exactly ``w + s * d`` in float32 (product rounded, then sum).
        GANSpace: ``w`` with styles ``start:end`` moved so that their coordinate along the
        component is ``s`` standard deviations (measured on style 0, as e4e does).
    """
    as_numpy = isinstance(w_plus, np.ndarray)
    w = torch.from_numpy(np.asarray(w_plus, dtype=np.float32)) if as_numpy else w_plus
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w_plus must be a torch tensor or numpy array, got {type(w_plus).__name__}")
    single = w.ndim == 2
    if single:
        w = w[None]
    if w.ndim != 3 or w.shape[-1] != STYLE_DIM:
        raise ValueError(f"w_plus has shape {tuple(w_plus.shape)}: expected [B, n_styles, 512] or [n_styles, 512]")
    w = w.float()
    if not isinstance(direction, Direction):
        direction = Direction(name="direction", kind="linear", vector=_linear_vector(_as_float_tensor(direction, "direction"), "direction"))
    direction.check(w.shape[1])
    s = torch.as_tensor(np.asarray(strength, dtype=np.float32) if not isinstance(strength, torch.Tensor) else strength)
    s = s.to(device=w.device, dtype=torch.float32).reshape(-1)
    if s.numel() not in (1, w.shape[0]):
        raise ValueError(f"strength has {s.numel()} values for {w.shape[0]} latents: give one, or one per latent")
    s = s.expand(w.shape[0])
    if direction.kind == "linear":
        d = direction.vector.to(w)
        d = d[None, None] if d.ndim == 1 else d[None]  # [1, 1|n, 512]
        step = s[:, None, None] * d  # rounded product, then the sum: bit-equal to numpy's w + s * d
        out = w + step
    else:
        end = w.shape[1] if direction.end is None else direction.end
        out = w.clone()
        out[:, direction.start:end] = w[:, direction.start:end] + _ganspace_delta(w, direction, s)[:, None]
    if single:
        out = out[0]
    return out.cpu().numpy() if as_numpy else out


# ---------------------------------------------------------------------------------------------
# Fitting


def fit_direction(
    w_plus: np.ndarray | torch.Tensor,
    labels: Sequence[bool] | np.ndarray,
    method: str = "logistic",
    l2: float = 0.1,
    max_iter: int = 200,
) -> np.ndarray:
    """A unit direction in latent space along which ``labels`` go from False to True.

    Args:
        w_plus: ``[N, n_styles, 512]`` (gives an ``[n_styles, 512]`` direction) or ``[N, 512]``
            (gives ``[512]``, the same offset for every style; pass ``w_plus.mean(1)`` to fit on W).
        labels: N booleans (or 0/1), both classes present, at least 2 of each.
        method: ``"logistic"`` -- L2-regularised logistic regression on the centred, per-feature
            standardised latents, fitted with L-BFGS (torch, float64, deterministic), weights mapped
            back to latent space -- or ``"mean_difference"`` (mean of True minus mean of False).
        l2: regularisation strength of the logistic fit (per sample).

    Returns:
        float32 numpy, unit Frobenius norm, oriented towards ``labels == True``.
    """
    x = w_plus.detach().cpu().numpy() if isinstance(w_plus, torch.Tensor) else np.asarray(w_plus)
    y = np.asarray(labels)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be booleans or 0/1")
        y = y.astype(bool)
    if x.ndim not in (2, 3) or x.shape[-1] != STYLE_DIM or x.shape[0] != y.shape[0]:
        raise ValueError(f"w_plus has shape {x.shape} for {y.shape[0]} labels: expected [N, n_styles, 512] or [N, 512]")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"labels have {n_pos} True and {n_neg} False: need at least 2 of each to fit a direction")
    shape = x.shape[1:]
    flat = x.reshape(len(x), -1).astype(np.float64)
    if method == "mean_difference":
        d = flat[y].mean(0) - flat[~y].mean(0)
    elif method == "logistic":
        d = _logistic_weights(flat, y, l2, max_iter)
    else:
        raise ValueError(f"method {method!r}: expected 'logistic' or 'mean_difference'")
    norm = np.linalg.norm(d)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("the fitted direction is zero: the labels do not separate the latents")
    return (d / norm).reshape(shape).astype(np.float32)


def _logistic_weights(x: np.ndarray, y: np.ndarray, l2: float, max_iter: int) -> np.ndarray:
    """Latent-space weights of an L2 logistic regression (balanced classes) on standardised x."""
    mu = x.mean(0)
    sd = x.std(0)
    sd[sd == 0] = 1.0
    xs = torch.from_numpy((x - mu) / sd)
    t = torch.from_numpy(y.astype(np.float64))
    # Balanced sample weights: a rare label does not just move the bias.
    sw = torch.where(t > 0, 0.5 / t.sum(), 0.5 / (1 - t).sum())
    w = torch.zeros(xs.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = xs @ w + b
        loss = (sw * nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")).sum()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # A step of size 1 along the standardised axes is a step of sd in latent space; the decision
    # normal in latent coordinates is w / sd.
    return w.detach().numpy() / sd


# ---------------------------------------------------------------------------------------------
# Decoding


class LatentDecoder(nn.Module):
    """A StyleGAN2 generator used as W+ -> image, the way ``PSP.decode`` does it (constant noise,
    ``AdaptiveAvgPool2d(256)`` when ``resize``).

    Attributes: ``generator``, ``n_styles``, ``output_size``, ``checkpoint_sha256``.
    """

    def __init__(self, generator: nn.Module, checkpoint_sha256: str | None = None):
        super().__init__()
        self.generator = generator
        self.face_pool = nn.AdaptiveAvgPool2d((256, 256))
        self.n_styles = int(generator.n_latent)
        self.output_size = int(generator.size)
        self.checkpoint_sha256 = checkpoint_sha256

    @property
    def device(self) -> torch.device:
        return self.generator.input.input.device

    def forward(self, w_plus: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """W+ ``[B, n_styles, 512]`` -> images ``[B, 3, H, W]`` (about [-1, 1]; H = 256 if ``resize``)."""
        if w_plus.ndim != 3 or tuple(w_plus.shape[1:]) != (self.n_styles, STYLE_DIM):
            raise ValueError(
                f"w_plus has shape {tuple(w_plus.shape)}: expected [B, {self.n_styles}, {STYLE_DIM}] "
                f"for this {self.output_size}px generator"
            )
        images, _ = self.generator([w_plus], input_is_latent=True, randomize_noise=False)
        return self.face_pool(images) if resize else images


def load_decoder(
    path_or_uri: str | os.PathLike,
    device: str | torch.device = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> LatentDecoder:
    """The generator of a pSp checkpoint (its ``decoder``) or of a rosinality StyleGAN2 file
    (``g_ema``), as a :class:`LatentDecoder` in eval mode on ``device``.
    """
    from psp_core.checkpoint import CheckpointError, load_psp, load_stylegan2

    try:
        net = load_psp(path_or_uri, device="cpu", storage_options=storage_options)
    except CheckpointError as e:
        if "'g_ema'" not in str(e):
            raise
        gen = load_stylegan2(path_or_uri, device=device, storage_options=storage_options)
        return LatentDecoder(gen, gen.checkpoint_sha256).eval()
    decoder = LatentDecoder(net.decoder, net.checkpoint_sha256)
    del net  # the encoder is not needed: only the generator goes to the device
    return decoder.to(device).eval()
