"""``ddpm data photos``: random crops of real colour photographs, one folder per source photo.

The photographs are the colour ones that ship inside scikit-image's wheel (``skimage.data``; nothing is
downloaded): an astronaut, a cat, a cup of coffee, a rocket, a motorcycle, the Hubble deep field, a stained tissue
section (immunohistochemistry) and a retina. The grey photographs of the package (camera, moon, brick, grass, ...)
are left out rather than converted, so every image is a true RGB photo; so are the synthetic images (colour wheel,
logo) and the right view of the stereo motorcycle (almost the left one, a label a classifier could not learn).

Each crop is a square of a random size, log-uniform between 1/4 of the photo's shorter side and all of it (several
scales: from close-ups of texture to the whole scene), at a random place, resized to ``size`` with LANCZOS. Crop i
goes to the photo ``i mod 8`` (equal classes) and draws from its own generator seeded with ``(seed, i)``, so a seed
gives the same files on every run, and the first N crops of a larger count are the N crops of a smaller one::

    OUTPUT/astronaut/0000.png  OUTPUT/chelsea/0001.png  ...  OUTPUT/retina/1999.png

The folder names the photo, so ``ddpm preprocess`` labels each crop with its source photo and FD-cls (whose
classifier learns which photo a crop came from) applies, as it does to the digits.

``OUTPUT/_photos.json`` records the generator's settings (size, seed, and how many crops the folder holds), written
before the first crop: a later run into the same folder with another size or seed is refused rather than mixing two
datasets, as is a run into a folder that holds other files. ``ddpm preprocess`` leaves that file out.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines import storage
from pipelines.data.digits import write_images
from pipelines.errors import UserError

# folder (label) -> scikit-image loader; the loaders read files inside the installed package
PHOTOS: dict[str, str] = {
    "astronaut": "astronaut",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "motorcycle": "stereo_motorcycle",  # the left view
    "hubble": "hubble_deep_field",
    "ihc": "immunohistochemistry",
    "retina": "retina",
}
SETTINGS_FILE = "_photos.json"  # the generator's settings, beside the photo folders
MIN_SCALE = 0.25  # the smallest crop's side, as a fraction of the photo's shorter side
CHUNK = 256  # crops held in memory at once: the writer streams, whatever the count


def load_photos() -> dict[str, np.ndarray]:
    """The photographs: name -> (H, W, 3) uint8, from the files inside scikit-image (no download)."""
    import skimage.data  # imported here: `ddpm --help` and the digits never pay for it

    photos = {}
    for name, loader in PHOTOS.items():
        image = getattr(skimage.data, loader)()
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
            image = image[0]
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise RuntimeError(f"scikit-image's {loader} is {image.dtype} {image.shape}, not an RGB uint8 photo")
        photos[name] = image
    return photos


def crop_box(shape: tuple[int, ...], size: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random square (left, top, right, bottom) inside an (H, W, ...) photo: side log-uniform in
    [MIN_SCALE, 1] x the shorter side (but at least ``size`` pixels when the photo allows), position uniform."""
    h, w = shape[:2]
    short = min(h, w)
    side = short * math.exp(rng.uniform(math.log(MIN_SCALE), 0.0))
    side = min(short, max(int(round(side)), size))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return left, top, left + side, top + side


def photo_crops(photos: dict[str, np.ndarray], indices: range, size: int, seed: int
                ) -> tuple[np.ndarray, list[str]]:
    """Crops number ``indices`` for ``seed``: images (n, size, size, 3) uint8 and their photos' names."""
    from PIL import Image

    names = list(photos)
    images, labels = np.empty((len(indices), size, size, 3), np.uint8), []
    for j, i in enumerate(indices):
        name = names[i % len(names)]
        rng = np.random.default_rng([seed, i])  # crop i's own draws: independent of the count and of the others
        box = crop_box(photos[name].shape, size, rng)
        images[j] = np.asarray(Image.fromarray(photos[name]).resize((size, size), Image.LANCZOS, box=box))
        labels.append(name)
    return images, labels


def write_photos(output_uri: str, *, count: int = 2000, size: int = 64, seed: int = 0, fmt: str = "png",
                 endpoint_url: str | None = None) -> dict[str, int]:
    """Write ``count`` crops of ``size`` x ``size`` under ``output_uri``, one folder per photo; returns the crops
    per photo."""
    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    if not 8 <= size <= 512:  # the smallest photo's shorter side is 300: larger crops would all be upscaled
        raise ValueError(f"--size must be between 8 and 512 pixels, got {size}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"--seed must be between 0 and 2^63 - 1, got {seed}")
    record_settings(output_uri, size=size, seed=seed, count=count, endpoint_url=endpoint_url)
    photos = load_photos()
    per_photo = dict.fromkeys(photos, 0)
    for start in range(0, count, CHUNK):
        images, labels = photo_crops(photos, range(start, min(start + CHUNK, count)), size, seed)
        write_images(output_uri, images, labels, fmt=fmt, first_index=start, endpoint_url=endpoint_url)
        for name in labels:
            per_photo[name] += 1
    return per_photo


def record_settings(output_uri: str, *, size: int, seed: int, count: int, endpoint_url: str | None = None) -> None:
    """Write ``OUTPUT/_photos.json``; refuse a folder made with another size or seed, or holding other files.

    The same size and seed give the same crop i whatever the count, so a rerun with another count only adds (or
    rewrites) crops of the same dataset; the record keeps the largest count written.
    """
    uri = storage.join(output_uri, SETTINGS_FILE)
    settings = {"dataset": "photos", "size": size, "seed": seed, "count": count}
    if storage.exists(uri, endpoint_url):
        found = storage.read_json(uri, endpoint_url)
        if (found.get("size"), found.get("seed")) != (size, seed):
            raise UserError(f"--output {output_uri} holds crops made with --size {found.get('size')} --seed "
                            f"{found.get('seed')}; --size {size} --seed {seed} would mix two datasets in one "
                            f"folder: choose another --output, or the same --size and --seed")
        settings["count"] = max(count, int(found.get("count") or 0))
    elif storage.list_files(output_uri, endpoint_url):
        raise UserError(f"--output {output_uri} holds other files (no {SETTINGS_FILE}): crops written there would "
                        f"mix with them; choose an empty --output")
    storage.write_json(uri, settings, endpoint_url)
