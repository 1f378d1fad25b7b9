"""Check, downsize and encode one fetched image, with img2dataset's rules for the size options.

`keep_ratio` brings the short side down to `image_size`, `keep_ratio_largest` the long side;
fetchers only ever shrink (the paper's sources are large; upscaling adds nothing). Untouched
images already in the target format keep their original bytes.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

FETCHER_RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest")
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class BadImage(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class PreparedImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 0  # 0: never resize
    resize_mode: str = "keep_ratio"
    min_image_size: int = 0
    encode_format: str = "jpg"
    encode_quality: int = 95

    def __call__(self, data: bytes) -> PreparedImage:
        return prepare_image(data, self)


def prepare_image(data: bytes, opts: ImageOptions) -> PreparedImage:
    if not data:
        raise BadImage("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: a truncated or garbled file fails here, not downstream
    except Image.DecompressionBombError:
        raise BadImage("image area too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise BadImage("corrupt image") from None
    ow, oh = img.size
    if min(ow, oh) < max(opts.min_image_size, 1):
        raise BadImage("image too small")

    side = {"keep_ratio": min(ow, oh), "keep_ratio_largest": max(ow, oh)}.get(opts.resize_mode, 0)
    resized = bool(opts.image_size) and side > opts.image_size
    if resized:
        scale = opts.image_size / side
        size = (max(1, round(ow * scale)), max(1, round(oh * scale)))
        img = _rgb(img).resize(size, Image.BICUBIC, reducing_gap=3.0)

    if not resized and img.format == _PIL_FORMAT[opts.encode_format]:
        return PreparedImage(data, opts.encode_format, ow, oh, ow, oh)
    buf = io.BytesIO()
    save_kw = {"quality": opts.encode_quality} if opts.encode_format in ("jpg", "webp") else {}
    _rgb(img).save(buf, format=_PIL_FORMAT[opts.encode_format], **save_kw)
    return PreparedImage(buf.getvalue(), opts.encode_format, img.width, img.height, ow, oh)


def _rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (what img2dataset does)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")
