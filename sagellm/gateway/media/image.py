"""An image's bytes decoded with PIL, safely: only the raster formats clients send (PIL's EPS reader would run
Ghostscript on a request's bytes), the pixel count checked from the header before any pixel is decoded (a
decompression bomb: a few kilobytes of PNG that decode to gigabytes), the file's structure verified, then every pixel
decoded here so a truncated file is refused now rather than failing in the processor. The image is returned in its
own mode: converting it (to RGB, say) is the processor's job."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from sagellm.gateway.media.refusal import refused

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def decode_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """The decoded image; a 400 naming `param` for bytes that are not a whole image of IMAGE_FORMATS, or one of more
    than `max_pixels` pixels. Blocks (decoding): called off the event loop."""
    try:
        header = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise refused(param, f"not an image this server reads ({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as error:  # over twice PIL's own limit, whatever ours is
        raise refused(param, f"the image has too many pixels ({error})") from None
    width, height = header.size
    if width * height > max_pixels:
        raise refused(param, f"the image is {width}x{height} pixels, over the limit of {max_pixels} pixels")
    try:
        header.verify()  # the structure and checksums, without decoding; the image cannot be used after it
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        image.load()
    except Exception as error:  # PIL reports a corrupt file as OSError, SyntaxError, ValueError, EOFError, ...
        raise refused(param, f"the image is corrupt or truncated ({error})") from None
    return image
