"""Tiny datasets written into a folder in the exact on-disk layouts the loaders expect.

Each image is a flat colour chosen from its label, so a test can check that the loader paired
every image with the right label after splitting and shuffling. Real JPEG / PNG / ... files
(via PIL) and the real text / CSV formats are written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
ISIC_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
# well separated flat colours, one per class index
PALETTE = [(230, 30, 30), (30, 30, 230), (30, 200, 30), (230, 230, 30), (200, 30, 200),
           (30, 200, 200), (250, 250, 250), (10, 10, 10)]


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 10),
                mode: str = "RGB") -> Path:
    """A flat image of ``colour`` (converted to ``mode``) at ``size`` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour).convert(mode)
    kwargs = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    img.save(path, **kwargs)
    return path


def write_garbage(path: Path) -> Path:
    """A file with an image extension whose content is not an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a JPEG file\x00\xff\xd8 garbage" * 8)
    return path


def write_truncated(path: Path, colour: tuple[int, int, int] = (90, 120, 200)) -> Path:
    """A real JPEG cut in half: PIL's ``verify()`` accepts it, decoding fails."""
    write_image(path, colour, (64, 48))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_celeba(root: Path, partition: list[int], smiling: list[bool], bald: list[bool] | None = None,
                size: tuple[int, int] = (24, 30), crop: int = 16) -> list[str]:
    """Official CelebA layout with ``len(partition)`` images. Each image is green outside its
    centered ``crop`` x ``crop`` square, which is white when smiling, black otherwise (so a
    correct center crop shows no green). Returns the file names."""
    n = len(partition)
    bald = bald if bald is not None else [i % 3 == 0 for i in range(n)]
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    width, height = size
    left, top = (width - crop) // 2, (height - crop) // 2
    for name, smile in zip(files, smiling):
        img = Image.new("RGB", size, (0, 200, 0))
        img.paste((255, 255, 255) if smile else (0, 0, 0), (left, top, left + crop, top + crop))
        (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
        img.save(root / "img_align_celeba" / name, quality=95)
    col_smile, col_bald = CELEBA_ATTRIBUTES.index("Smiling"), CELEBA_ATTRIBUTES.index("Bald")
    lines = [str(n), " ".join(CELEBA_ATTRIBUTES)]
    for i, name in enumerate(files):
        values = ["-1"] * len(CELEBA_ATTRIBUTES)
        values[col_smile] = "1" if smiling[i] else "-1"
        values[col_bald] = "1" if bald[i] else "-1"
        lines.append(name + " " + " ".join(f"{v:>2}" for v in values))  # official padding
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, partition)))
    return files


def make_isic(root: Path, per_class: list[int]) -> dict[str, int]:
    """ISIC 2018 Task 3 layout with ``per_class[c]`` images of class c (flat colour
    ``PALETTE[c]``). Returns {image id: label}."""
    labels: dict[str, int] = {}
    rows = ["image," + ",".join(ISIC_CLASSES)]
    k = 24306
    for c, count in enumerate(per_class):
        for _ in range(count):
            image_id = f"ISIC_{k:07d}"
            k += 1
            write_image(root / "ISIC2018_Task3_Training_Input" / f"{image_id}.jpg", PALETTE[c], (16, 12))
            rows.append(image_id + "," + ",".join("1.0" if j == c else "0.0" for j in range(len(ISIC_CLASSES))))
            labels[image_id] = c
    csv_path = root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text("\n".join(rows) + "\n")
    return labels


FOLDER_FORMATS = [(".jpg", "RGB"), (".PNG", "RGBA"), (".bmp", "RGB"), (".jpeg", "L"), (".tif", "RGB"),
                  (".webp", "RGB"), (".png", "L")]


def make_folder(folder: Path, per_class: dict[str, int]) -> dict[str, int]:
    """``folder/<class>/<image>`` with ``per_class[name]`` images; classes are coloured by
    their sorted position, file formats / modes / sizes vary. Adds a non-image file that must
    be ignored. Returns {class name: sorted index}."""
    index = {name: i for i, name in enumerate(sorted(per_class))}
    for name, count in per_class.items():
        for j in range(count):
            ext, mode = FOLDER_FORMATS[j % len(FOLDER_FORMATS)]
            size = (10 + 3 * (j % 4), 8 + 5 * (j % 3))
            write_image(folder / name / f"img_{j:03d}{ext}", PALETTE[index[name]], size, mode)
        (folder / name / "notes.txt").write_text("not an image\n")
    return index


def write_report_job(root: Path, name: str, overrides: list[str], prior: str, metrics: dict, rows: list[dict],
                     experiment: str = "table1") -> None:
    """A finished job folder as ``disc_pl.report`` reads it: .hydra config + overrides,
    metrics.json and results.csv (``rows``: dicts with the same keys)."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(
        f"prior: {{name: {prior}}}\nmanifold: {{name: dep}}\nspace: {{name: lso}}\n"
        f"query: {{corruption: {{name: null, severity: 3}}}}\nexperiment_name: {experiment}\n")
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "metrics.json").write_text(json.dumps(metrics))
    with (job / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
