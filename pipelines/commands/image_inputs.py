"""The image files a command reads (``ddpm inpaint``'s and ``ddpm edit``'s image and mask, ``ddpm vary``'s images),
decoded and checked the way the HTTP routes decode theirs (``ddpm.images.decode_edit_inputs``)."""

from __future__ import annotations

from pathlib import Path

from pipelines.errors import UserError


def read_inputs(image_path: str, mask_path: str | None, size: int, channels: int, resize: bool):
    """The two files (no mask: the whole image) -> (image (size, size, C) uint8, generate (size, size) bool), checked
    by ``ddpm.images.decode_edit_inputs`` (what ``POST /inpaint`` uses too); errors name the file at fault."""
    from ddpm.images import EditInputError, decode_edit_inputs

    paths = {"image": image_path} | ({} if mask_path is None else {"mask": mask_path})
    data = {"mask": None}
    for field, path in paths.items():
        try:
            data[field] = Path(path).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return decode_edit_inputs(data["image"], data["mask"], size=size, channels=channels, resize=resize,
                                  resize_hint="pass --resize to stretch image and mask to it")
    except EditInputError as exc:
        raise UserError(f"{paths[exc.field]}: {exc}") from None
