"""Per-task input transforms and image conversions, as the original pSp inference scripts apply them.

Each released checkpoint's `opts['dataset_type']` names a task; `get_task(name)` returns a `Task` whose
`transform` turns a PIL image into exactly the tensor the original `transform_inference`
(`configs/transforms_config.py`) gives, including the dataset's `convert('RGB')` / `convert('L')`.
torchvision is not used: its PIL-path operations are written out here.

    Resize((256, 256))   PIL `img.resize((256, 256), BILINEAR)` (antialiased when shrinking)
    ToTensor()           uint8 HxWxC -> float32 CxHxW / 255; a non-uint8 numpy array is only transposed
    Normalize(.5, .5)    (x - 0.5) / 0.5
    ToPILImage()         float CxHxW -> `x.mul(255).byte()` (truncation) -> PIL

Known quirks reproduced on purpose (spec section 3.2):
- seg maps go through a *bilinear* resize, so label values blend at region borders before one-hot;
- the super-resolution "BilinearResize" is the bicubic `BicubicDownSample`; factor 1 is not the
  identity but a half-pixel-shifted 4-tap cubic blur;
- the downsampled image is truncated (not rounded) to uint8 before being resized back to 256.
Consciously dropped: the random per-image super-resolution factor (a factor must be passed), and the
NumPy >= 2 crash of the original `ToOneHot`.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "Task",
    "get_task",
    "known_tasks",
    "bicubic_downsample",
    "tensor2im",
    "images_to_uint8",
    "tensor2sketch",
    "tensor2map",
    "CELEBA_MASK_COLORS",
    "SUPER_RESOLUTION_FACTORS",
    "INPUT_SIZE",
]

INPUT_SIZE = 256
SUPER_RESOLUTION_FACTORS = (1, 2, 4, 8, 16, 32)

# The 19-class CelebAMask-HQ palette of the original `utils.common.get_colors()`, index = label.
CELEBA_MASK_COLORS = np.array(
    [
        [0, 0, 0], [204, 0, 0], [76, 153, 0], [204, 204, 0], [51, 51, 255], [204, 0, 204],
        [0, 255, 255], [255, 204, 204], [102, 51, 0], [255, 0, 0], [102, 204, 0], [255, 255, 0],
        [0, 0, 153], [0, 0, 204], [255, 51, 153], [0, 204, 204], [0, 51, 0], [255, 153, 51],
        [0, 204, 0],
    ],
    dtype=np.uint8,
)

_FACTOR_MISSING = (
    "super-resolution needs a factor: pass factor= (Task.transform) "
    "(the released model was trained with 1,2,4,8,16,32)"
)
# Reflect padding of ceil(3*factor/2) rows must stay below the 256-pixel side.
_MAX_FACTOR = 170


# ----------------------------------------------------------------------------------------------
# torchvision-equivalent building blocks (PIL path)


def _resize_256(img: Image.Image) -> Image.Image:
    """torchvision `Resize((256, 256))` on a PIL image: PIL bilinear (PIL returns a copy if equal)."""
    return img.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision `ToTensor` on an 8-bit PIL image ('L' or 'RGB'): float32 [C,H,W] in [0,1]."""
    arr = np.array(img, dtype=np.uint8, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div(255)


def _normalize_half(x: torch.Tensor) -> torch.Tensor:
    """torchvision `Normalize([.5]*C, [.5]*C)`: [0,1] -> [-1,1]."""
    return x.sub(0.5).div(0.5)


def _tensor_to_pil_rgb(x: torch.Tensor) -> Image.Image:
    """torchvision `ToPILImage` on a float [3,H,W] tensor: `mul(255).byte()` truncates."""
    arr = x.mul(255).byte().permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr)


@functools.lru_cache(maxsize=16)
def _byte_table(normalized: bool, device: torch.device) -> torch.Tensor:
    """float32 [256]: ToTensor's k/255 (then Normalize(.5, .5) when `normalized`) for every byte k,
    computed on the CPU exactly as torchvision does, then moved to `device`."""
    table = torch.arange(256, dtype=torch.uint8).float().div(255)
    if normalized:
        table = _normalize_half(table)
    return table.to(device)


def _bytes_to_unit_cpu(pixels: np.ndarray, normalized: bool) -> torch.Tensor:
    """`_byte_table`'s values for uint8 [B,H,W,3] (-> float32 [B,3,H,W]) or [B,H,W] (-> [B,1,H,W]),
    computed on the CPU in float32, which IEEE rounds the same in numpy: k/255, and for the
    normalized values k/127.5 - 1, which equals torchvision's (k/255 - 0.5)/0.5 for every byte k
    (two passes over the floats instead of three; tests/test_tasks.py checks every byte value).
    One image at a time, so the float copy stays in cache (a third of the time of a table lookup
    over the batch)."""
    channels_last = pixels.ndim == 4
    out = np.empty((pixels.shape[0], pixels.shape[3] if channels_last else 1, *pixels.shape[1:3]), np.float32)
    divisor = np.float32(127.5 if normalized else 255)
    for src, dst in zip(pixels, out):
        np.copyto(dst, src.transpose(2, 0, 1) if channels_last else src[None], casting="unsafe")
        np.divide(dst, divisor, out=dst)
        if normalized:
            np.subtract(dst, np.float32(1), out=dst)
    return torch.from_numpy(out)


def _copy_into(out: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`values` copied into `out` (same shape), which is returned."""
    if out.shape != values.shape:
        raise ValueError(f"prepare: out has shape {out.shape}, the result {values.shape}")
    np.copyto(out, values)
    return out


def _as_pil(image: Image.Image | np.ndarray, name: str = "image") -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(
                f"{name}: expected a PIL image or a uint8 HxW / HxWx3 array, "
                f"got an array of dtype {image.dtype} and shape {image.shape}"
            )
        return Image.fromarray(image)
    raise TypeError(f"{name}: expected a PIL image or a uint8 numpy array, got {type(image).__name__}")


# ----------------------------------------------------------------------------------------------
# Bicubic downsampling (the original `BicubicDownSample`, used by "BilinearResize")


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys cubic convolution kernel with a = -0.5, evaluated in float32 like the original."""
    ax = torch.abs(x)
    if ax <= 1.0:
        return (a + 2.0) * torch.pow(ax, 3.0) - (a + 3.0) * torch.pow(ax, 2.0) + 1
    if 1.0 < ax < 2.0:
        return a * torch.pow(ax, 3) - 5.0 * a * torch.pow(ax, 2.0) + 8.0 * a * ax - 4.0 * a
    return torch.zeros((), dtype=torch.float32)


def _bicubic_kernel(factor: int) -> torch.Tensor:
    """1-D kernel of length 4*factor, taps at (i - floor(size/2) + 0.5)/factor, summing to 1."""
    size = 4 * factor
    centre = torch.floor(torch.tensor(size / 2))  # float32, as the original
    taps = torch.stack([_cubic((i - centre + 0.5) / factor) for i in range(size)]).to(torch.float32)
    return taps / torch.sum(taps)


def check_resize_factor(factor) -> int:
    """A super-resolution factor: an integer in 1..170 (ValueError otherwise); returns it."""
    if factor is None:
        raise ValueError(_FACTOR_MISSING)
    if isinstance(factor, bool):
        raise ValueError(f"resize factor must be an integer, got {factor!r}")
    try:
        value = operator.index(factor)
    except TypeError:
        if isinstance(factor, float) and factor.is_integer():
            value = int(factor)
        else:
            raise ValueError(f"resize factor must be an integer, got {factor!r}") from None
    if not 1 <= value <= _MAX_FACTOR:
        raise ValueError(
            f"resize factor {value} is out of range: use an integer in 1..{_MAX_FACTOR} "
            "(the released model was trained with 1,2,4,8,16,32)"
        )
    return value


def bicubic_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Downsample by an integer factor with the original pSp `BicubicDownSample` (forward defaults).

    x: float tensor [B,C,H,W] or [C,H,W] (pSp feeds [0,1] images). Returns [B,C,H//f,W//f] (or
    [C,...]) in float32: rows are reflect-padded by 3*factor (floor above, ceil below) and
    convolved with stride `factor`, then the same for columns. Like the original forward (with
    clip_round=False) the result is NOT clamped: the cubic's negative lobes can overshoot [0,1];
    the super-resolution transform clamps afterwards, as the original `BilinearResize` does.
    Factor 1 keeps the size but applies a half-pixel-shifted cubic blur ([-1, 9, 9, -1] / 16).
    """
    f = check_resize_factor(factor)
    if not torch.is_tensor(x):
        raise TypeError(f"bicubic_downsample: x must be a torch tensor, got {type(x).__name__}")
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"bicubic_downsample: x must be [B,C,H,W] or [C,H,W], got shape {tuple(x.shape)}")
    x = x.to(torch.float32)
    channels = x.shape[1]
    k = _bicubic_kernel(f).to(x.device)
    size = 4 * f
    pad = max(size - f, 0)
    before, after = pad // 2, pad - pad // 2
    if min(x.shape[-2:]) <= after:
        raise ValueError(
            f"bicubic_downsample: image {tuple(x.shape[-2:])} is too small for factor {f} "
            f"(reflect padding needs more than {after} pixels per side)"
        )
    rows = k.reshape(1, 1, size, 1).repeat(channels, 1, 1, 1)
    cols = k.reshape(1, 1, 1, size).repeat(channels, 1, 1, 1)
    x = F.pad(x, (0, 0, before, after), mode="reflect")
    x = F.conv2d(x, rows, stride=(f, 1), groups=channels)
    x = F.pad(x, (before, after, 0, 0), mode="reflect")
    x = F.conv2d(x, cols, stride=(1, f), groups=channels)
    return x[0] if squeeze else x


def _degrade(img: Image.Image, factor: int) -> Image.Image:
    """The original `BilinearResize` with one fixed factor: bicubic down, clamp, truncate to uint8."""
    low = bicubic_downsample(_pil_to_tensor(img).unsqueeze(0), factor)[0].clamp(0, 1)
    return _tensor_to_pil_rgb(low)


# ----------------------------------------------------------------------------------------------
# Seg labels (the original `ToOneHot`, without its NumPy >= 2 crash: one-hot in `to_model_input`)


def _check_labels(labels: np.ndarray, n_classes: int) -> None:
    """uint8 label map [H,W]: labels >= n_classes are an error (the original `ToOneHot` would index
    past its one-hot)."""
    top = int(labels.max()) if labels.size else 0
    if top >= n_classes:
        bad = np.unique(labels[labels >= n_classes])
        raise ValueError(
            f"segmentation map has label values {bad[:10].tolist()} but the model knows only "
            f"{n_classes} classes (0..{n_classes - 1}): pass a grayscale map whose pixel values are "
            "class indices (CelebAMask-HQ layout), not a colour visualisation"
        )


# ----------------------------------------------------------------------------------------------
# Tensor -> image conversions (the original `log_input_image` family)


def _to_numpy(t, name: str) -> np.ndarray:
    if torch.is_tensor(t):
        t = t.detach().cpu()
        if t.dtype not in (torch.float32, torch.float64) and t.is_floating_point():
            t = t.float()
        return t.numpy()
    if isinstance(t, np.ndarray):
        return t
    raise TypeError(f"{name}: expected a torch tensor or numpy array, got {type(t).__name__}")


def tensor2im(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A [3,H,W] image in ~[-1,1] (torch or numpy) -> uint8 HxWx3, as the original `tensor2im`.

    (x + 1) / 2, clipped to [0,1], times 255, then cast: FLOOR, not round (0.999 -> 254). Arithmetic
    stays in the input's float precision like the original. NaN becomes 0.
    """
    arr = _to_numpy(t, "tensor2im")
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(
            f"tensor2im: expected one image [3,H,W], got shape {tuple(arr.shape)}; "
            "for a batch call tensor2im(batch[i])"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    arr = np.transpose(arr, (1, 2, 0))
    arr = (arr + 1) / 2
    arr = np.clip(np.nan_to_num(arr, nan=0.0), 0, 1) * 255
    return arr.astype(np.uint8)


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """`tensor2im` for a batch, on the images' device: [B,3,H,W] float -> uint8 [B,H,W,3] (contiguous).

    The same float32 operations in the same order as `tensor2im` ((x + 1) / 2, NaN -> 0, clip to
    [0,1], times 255, truncating cast), so every byte equals `tensor2im(images[i])`; half and
    bfloat16 inputs are widened to float32 first, as `tensor2im` does.
    """
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images_to_uint8: expected float images [B,3,H,W], got {images.dtype} {tuple(images.shape)}")
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    return _uint8_per_image(x) if x.device.type == "cpu" else _uint8_batched(x)


def _uint8_batched(x: torch.Tensor) -> torch.Tensor:
    """`images_to_uint8` in whole-batch operations (one kernel each: the GPU path)."""
    x = (x + 1) / 2
    x = torch.nan_to_num(x, nan=0.0).clamp(0, 1) * 255
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _uint8_per_image(x: torch.Tensor) -> torch.Tensor:
    """`images_to_uint8` as `tensor2im` of each image (numpy, one thread: torch's threads would wait
    on each other at every small operation on a busy host), so each image's temporaries stay in
    cache: ≈ 0.5 instead of 2.2 ms of CPU per 256² image (the batched form makes six full-size
    temporaries of the batch)."""
    src = x.detach().numpy()
    out = np.empty((src.shape[0], *src.shape[2:], src.shape[1]), np.uint8)
    for i, image in enumerate(src):
        out[i] = tensor2im(image)
    return torch.from_numpy(out)


def tensor2sketch(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A sketch [1,H,W] in [0,1] -> uint8 HxWx3 gray, as the original (x[0]*255, truncated).

    Values outside [0,1] are clipped first (the original's cast is undefined there).
    """
    arr = _to_numpy(t, "tensor2sketch")
    if arr.ndim != 3:
        raise ValueError(f"tensor2sketch: expected [C,H,W], got shape {tuple(arr.shape)}")
    gray = np.clip(np.nan_to_num(arr[0].astype(np.float32), nan=0.0) * 255, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def tensor2map(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A class map [L,H,W] (one-hot or logits) -> uint8 HxWx3: argmax over L, CelebAMask palette."""
    arr = _to_numpy(t, "tensor2map")
    if arr.ndim != 3:
        raise ValueError(f"tensor2map: expected [L,H,W], got shape {tuple(arr.shape)}")
    if arr.shape[0] > len(CELEBA_MASK_COLORS):
        raise ValueError(
            f"tensor2map: {arr.shape[0]} classes but the palette has {len(CELEBA_MASK_COLORS)} colours"
        )
    return CELEBA_MASK_COLORS[np.argmax(arr, axis=0)]


# ----------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    """What a pSp checkpoint's `dataset_type` means for its inputs.

    name: the dataset_type. input_nc / label_nc: as in the checkpoint opts (label_nc 0 = photo).
    needs_alignment: whether inputs are face photos to FFHQ-align first (not sketches / seg maps).
    normalized: whether `transform` outputs [-1,1] (photos) rather than [0,1] / one-hot.
    needs_factor: whether `transform` requires a super-resolution factor.
    default_latent_mask: the README's style-mixing mask for this task, or None.
    trained_factors: super-resolution factors the released model was trained with (else empty).
    input_size: (height, width) of the transformed photo: (192, 256) for cars, else (256, 256).
    """

    name: str
    input_nc: int
    label_nc: int
    needs_alignment: bool
    normalized: bool
    needs_factor: bool = False
    default_latent_mask: tuple[int, ...] | None = None
    trained_factors: tuple[int, ...] = ()
    description: str = ""
    input_size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)

    @property
    def kind(self) -> str:
        """'photo', 'sketch', 'seg' or 'super_resolution': which transform pipeline applies."""
        if self.needs_factor:
            return "super_resolution"
        if self.label_nc == 0:
            return "photo"
        return "sketch" if self.label_nc == 1 else "seg"

    @property
    def prepared_shape(self) -> tuple[int, ...]:
        """Shape of one `prepare` result: (256, 256, 3) uint8 RGB for photos, (256, 256) gray/labels."""
        h, w = self.input_size
        return (h, w, 3) if self.label_nc == 0 else (h, w)

    def prepare(self, image: Image.Image | np.ndarray, factor: int | None = None,
                out: np.ndarray | None = None) -> np.ndarray:
        """The PIL part of `transform`: a PIL image (any mode, any size) -> uint8 `prepared_shape`.

        Photos: convert('RGB'), bilinear resize to 256 (a 256x256 RGB uint8 array passes as a copy:
        both steps are the identity on it). Super-resolution: also the degradation (bicubic down by
        `factor`, clamp, truncate to uint8, bilinear back to 256). Sketch / seg: convert('L') and
        resize; seg label values are checked here (ValueError naming the bad labels), so a bad map
        fails on the CPU side, alone. `to_model_input` does the rest on any device. out: a uint8
        array of `prepared_shape` to write the result into (and return), one copy fewer.
        """
        kind = self.kind
        if (
            kind == "photo" and isinstance(image, np.ndarray) and image.dtype == np.uint8
            and image.shape == self.prepared_shape
        ):
            # convert('RGB') and a same-size resize are copies
            return np.array(image, copy=True) if out is None else _copy_into(out, image)
        img = _as_pil(image)
        mode = "RGB" if self.label_nc == 0 else "L"
        if img.mode != mode:  # a same-mode convert is a copy
            img = img.convert(mode)
        if kind == "super_resolution":
            f = check_resize_factor(factor)
            img = _resize_256(_degrade(_resize_256(img), f))
        elif kind == "photo" and self.input_size != (INPUT_SIZE, INPUT_SIZE):
            # torchvision Resize((h, w)) on PIL: bilinear (the cars transforms use (192, 256)).
            img = img.resize((self.input_size[1], self.input_size[0]), Image.Resampling.BILINEAR)
        else:
            img = _resize_256(img)
        arr = np.array(img, dtype=np.uint8, copy=True) if out is None else _copy_into(out, np.asarray(img))
        if kind == "seg":
            _check_labels(arr, self.label_nc)
        return arr

    def to_model_input(self, prepared: torch.Tensor) -> torch.Tensor:
        """The tensor part of `transform`, batched, on `prepared`'s device (no PIL, no loop).

        prepared: uint8 [B, *prepared_shape] (what `prepare` gives, stacked). Returns float32
        [B, input_nc, 256, 256], contiguous: photos (x/255 - 0.5)/0.5, sketches x/255, seg maps the
        one-hot of the labels. Each byte is looked up in a 256-entry table computed on the CPU with
        torchvision's ToTensor/Normalize operations, so the result is bit-identical on any device
        (CUDA divides by a scalar as a multiplication by its reciprocal: 126 of the 256 values of
        x/255 would differ in the last bit).
        """
        if prepared.dtype != torch.uint8 or tuple(prepared.shape[1:]) != self.prepared_shape:
            raise ValueError(
                f"to_model_input: expected uint8 [B, {', '.join(map(str, self.prepared_shape))}] "
                f"(Task.prepare's output), got {prepared.dtype} {tuple(prepared.shape)}"
            )
        if self.label_nc <= 1:
            if prepared.device.type == "cpu":
                return _bytes_to_unit_cpu(prepared.numpy(), normalized=self.label_nc == 0)
            # Channels first while still bytes (a quarter of the float copy), then one gather.
            x = (prepared.permute(0, 3, 1, 2) if self.label_nc == 0 else prepared.unsqueeze(1)).contiguous()
            table = _byte_table(self.label_nc == 0, prepared.device)
            return table.index_select(0, x.reshape(-1).to(torch.int32)).view(x.shape)
        classes = torch.arange(self.label_nc, device=prepared.device, dtype=torch.uint8)
        return (prepared.unsqueeze(1) == classes.view(1, -1, 1, 1)).float()

    def transform(self, image: Image.Image | np.ndarray, factor: int | None = None) -> torch.Tensor:
        """A PIL image (any mode, any size) -> float32 tensor [input_nc,256,256], as the original.

        Photos: convert('RGB'), bilinear resize to 256, [0,1] -> [-1,1].
        Sketch: convert('L'), resize, [1,256,256] in [0,1].
        Seg:    convert('L') (pixel values = class indices), bilinear resize (labels blend at borders,
                as in the original), one-hot [label_nc,256,256] of 0.0/1.0.
        Super-resolution: as photos, but after the first resize the image is bicubic-downsampled by
                `factor`, clamped, truncated to uint8 and resized back to 256 bilinearly. `factor` is
                required (ValueError without it); other tasks ignore it.
        `to_model_input(prepare(image))` in two parts: the pipeline runs `prepare` on CPU workers
        and `to_model_input` on the model's device.
        """
        return self.to_model_input(torch.from_numpy(self.prepare(image, factor))[None])[0]

    def visualize_input(self, tensor: torch.Tensor | np.ndarray) -> np.ndarray:
        """A transformed input [input_nc,H,W] -> uint8 HxWx3 for display (the original
        `log_input_image`): photos via `tensor2im`, sketches as gray, seg maps in the 19-colour palette."""
        if self.label_nc == 0:
            return tensor2im(tensor)
        if self.label_nc == 1:
            return tensor2sketch(tensor)
        return tensor2map(tensor)


_PHOTO = dict(input_nc=3, label_nc=0, needs_alignment=True, normalized=True)
# e4e / ReStyle domains other than faces: photos, no alignment.
_SCENE = dict(input_nc=3, label_nc=0, needs_alignment=False, normalized=True)
_FINE_STYLES = tuple(range(8, 18))

_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("ffhq_encode", **_PHOTO, description="face photo -> W+ (also the toonify checkpoint)"),
        Task("ffhq_frontalize", **_PHOTO, description="face photo -> frontal face"),
        Task(
            "celebs_sketch_to_face", input_nc=1, label_nc=1, needs_alignment=False, normalized=False,
            default_latent_mask=_FINE_STYLES, description="grayscale sketch -> face",
        ),
        Task(
            "celebs_seg_to_face", input_nc=19, label_nc=19, needs_alignment=False, normalized=False,
            default_latent_mask=_FINE_STYLES, description="19-class CelebAMask-HQ label map -> face",
        ),
        Task(
            "celebs_super_resolution", **_PHOTO, needs_factor=True,
            trained_factors=SUPER_RESOLUTION_FACTORS, description="low-resolution face -> face",
        ),
        Task("toonify", **_PHOTO, description="face photo -> toon (ReStyle's toonify checkpoint)"),
        Task("cars_encode", **_SCENE, input_size=(192, 256), description="car photo (4:3) -> W+ (512 px generator)"),
        Task("church_encode", **_SCENE, description="church photo -> W+ (256 px generator)"),
        Task("horse_encode", **_SCENE, description="horse photo -> W+ (256 px generator)"),
        Task("afhq_wild_encode", **_SCENE, description="wild animal face -> W+ (512 px generator)"),
    )
}


def known_tasks() -> tuple[str, ...]:
    """The dataset_type names `get_task` accepts."""
    return tuple(_TASKS)


def get_task(dataset_type: str) -> Task:
    """The `Task` for a checkpoint's `opts['dataset_type']`; ValueError naming the known ones."""
    task = _TASKS.get(dataset_type)
    if task is None:
        raise ValueError(
            f"unknown dataset_type {dataset_type!r}: known tasks are {', '.join(_TASKS)} "
            "(toonify checkpoints use ffhq_encode)"
        )
    return task
