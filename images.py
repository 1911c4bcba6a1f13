"""
Images for Llip: decoding within a pixel budget (MAX_PIXELS), CLIP's normalisation, and the
training and evaluation transforms (random resized crop; resize and centre crop). The shard
loader (data.py) and the evaluation readers (eval_data.py) use them; data.X names each too.

    python -m pytest tests/test_data.py -q
"""
import math
import random
import warnings

import numpy as np
import torch
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)   # CLIP's per-channel statistics, RGB
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')   # image folders
SHARD_IMAGE_KEYS = IMAGE_EXTENSIONS[:4]   # shard members: img2dataset's and open_clip's


# ----------------------------------------------------------------------------- image transforms
def to_rgb(image):
    """Any PIL mode -> RGB. Transparent images are laid on white (convert('RGB') would show
    whatever colour the invisible pixels hold, often black); 16/32-bit and float images are
    scaled to 8 bits instead of being clipped to white."""
    if image.mode == 'RGB':
        return image
    if image.mode in ('I', 'F') or image.mode.startswith('I;16'):
        x = np.asarray(image, dtype=np.float32)
        if image.mode.startswith('I;16') or x.max() > 255:
            x = x * (255 / 65535)
        image = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), 'L')
    if image.mode == 'P':
        image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
    if image.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa'):
        rgba = image.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert('RGB')
    return image.convert('RGB')   # L, 1, CMYK, YCbCr, RGBX, ...


# The decoded-size budget: an image of more pixels is refused (skipped and counted as 'image too
# large') before it is decoded, except a JPEG, which is decoded at 1/2, 1/4 or 1/8 size until it
# fits. Memory then stays below about 12 bytes x MAX_PIXELS per image being decoded (200 MB for
# a 16-bit greyscale PNG, which passes through int32 and float32 on its way to 8 bits), where
# PIL alone allows 179 million pixels (2 GiB). 4096 x 4096 holds any ImageNet or COCO image.
MAX_PIXELS = 4096 * 4096


class ImageTooLarge(ValueError):
    """An image beyond MAX_PIXELS (or beyond PIL's own decompression-bomb limit)."""


def open_image(file, max_pixels=None):
    """Image.open (a path or a binary file object) within the pixel budget: the image, lazily
    decoded as PIL's always is, or ImageTooLarge. Only the header has been read when it raises.
    max_pixels: default MAX_PIXELS, read at call time."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():   # PIL warns from 89 million pixels; we refuse well before
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            image = Image.open(file)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from None
    width, height = image.size
    if width * height > max_pixels and image.format == 'JPEG':
        scale = 2 ** math.ceil(math.log2(math.sqrt(width * height / max_pixels)))   # 2, 4, 8, ...
        if scale <= 8:
            image.draft(image.mode, (math.ceil(width / scale), math.ceil(height / scale)))
    if image.size[0] * image.size[1] > max_pixels:
        image.close()
        raise ImageTooLarge(f'{width} x {height} pixels, more than the budget of {max_pixels} '
                            f'(images.MAX_PIXELS)')
    return image


_SCALE = 1 / (
    255 * torch.tensor(STD).view(3, 1, 1)
)  # (x / 255 - mean) / std == x * _SCALE + _SHIFT
_SHIFT = -torch.tensor(MEAN).view(3, 1, 1) / torch.tensor(STD).view(3, 1, 1)


def to_tensor(image):
    """PIL RGB image (W x H) -> normalised FloatTensor (3, H, W). Channels first while still
    uint8, then float: arithmetic on a contiguous tensor is 5x faster than on a permuted one."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()   # (3, H, W) uint8
    return x.float().mul_(_SCALE).add_(_SHIFT)


def random_resized_crop(width, height, rng, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    """The box (left, top, right, bottom) of a random crop covering `scale` of the area with
    an aspect ratio in `ratio` (the Inception / CLIP recipe); after 10 misses, the largest
    centred box whose aspect ratio is in range."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_transform(image_size, scale=(0.9, 1.0)):
    """PIL image -> FloatTensor (3, S, S): random resized crop (scale as open_clip's CLIP
    recipe), bicubic, CLIP normalisation. transform(image, rng) draws only from rng (a
    random.Random), so a sample's crop can be replayed; without rng it uses `random`."""
    def transform(image, rng=None):
        width, height = image.size
        left, top, right, bottom = random_resized_crop(width, height, rng or random, scale)
        if image.format == 'JPEG':
            # A JPEG decodes at 1/2, 1/4 or 1/8 size for a fraction of the cost: ask for the
            # smallest that leaves the crop >= image_size pixels, and scale the box with it.
            image.draft('RGB', (math.ceil(width * image_size / (right - left)),
                                math.ceil(height * image_size / (bottom - top))))
        fx, fy = image.size[0] / width, image.size[1] / height   # 1 unless drafted
        image = to_rgb(image)
        # resize with box= crops and scales in one pass, without an intermediate image
        box = (left * fx, top * fy, right * fx, bottom * fy)
        return to_tensor(image.resize((image_size, image_size), Image.BICUBIC, box=box))
    return transform


def eval_transform(image_size):
    """PIL image -> FloatTensor (3, S, S) as CLIP evaluates: bicubic resize of the short side
    to S, centre crop, CLIP normalisation. (The colour conversion comes first, so a palette
    image is resampled in colour, where CLIP's order would resample it nearest-neighbour.)"""
    def transform(image, rng=None):
        image = to_rgb(image)
        w, h = image.size
        size = (
            (image_size, int(image_size * h / w))
            if w <= h
            else (int(image_size * w / h), image_size)
        )
        left, top = int(round((size[0] - image_size) / 2)), int(round((size[1] - image_size) / 2))
        if size[0] * size[1] > MAX_PIXELS:
            # A thin image (1 x 250,000 pixels would resize to 224 x 56 million, GBs): resize
            # with box= only the centre crop, as a box in the original's pixels. (Not for every
            # image: Pillow's box resampling differs from resize-then-crop by a few levels.)
            fx, fy = w / size[0], h / size[1]
            box = (left * fx, top * fy, (left + image_size) * fx, (top + image_size) * fy)
            return to_tensor(image.resize((image_size, image_size), Image.BICUBIC, box=box))
        image = image.resize(size, Image.BICUBIC)
        return to_tensor(image.crop((left, top, left + image_size, top + image_size)))
    return transform
