"""Train a torchvision classifier on a folder of images, in plain PyTorch (no disc_pl).

    python examples/own_classifier/train.py --root /abs/path/to/images --epochs 10 --out weights.pt

``--root`` holds one sub-folder of images per class (torchvision ImageFolder layout). When it has
a ``train/`` sub-folder (``<root>/train/<class>/...``, with ``<root>/test/<class>/...`` beside it),
only ``train/`` is used, so the test images stay unseen: disc_pl then takes its queries from them.

The model is ``torchvision.models.<arch>(num_classes=K)`` with its standard layers: disc_pl
rebuilds it by name (``models.classifier.arch``) and loads the state dict saved here. The
images are resized to ``--image-size`` squares (bilinear, as disc_pl's ``dataset.image_size``)
and normalised with ImageNet's mean / std (``models.classifier.mean`` / ``std``, the defaults of
``conf/model/byo.yaml``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's: byo.yaml's defaults


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="folder with one sub-folder of images per class")
    parser.add_argument("--out", required=True, type=Path, help="where the state dict is saved (.pt)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--arch", default="resnet18", help="a torchvision model name (disc_pl: models.classifier.arch)")
    parser.add_argument("--image-size", type=int, default=64, help="side the images are resized to (dataset.image_size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    folder = args.root / "train" if (args.root / "train").is_dir() else args.root
    data = torchvision.datasets.ImageFolder(str(folder), transform=transforms.Compose([
        transforms.Resize((args.image_size, args.image_size)),
        transforms.RandomHorizontalFlip(),  # drop this where mirroring changes the class
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ]))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=len(data.classes)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"{len(data)} images of {len(data.classes)} classes {data.classes} in {folder}; {args.arch} on {device}")
    for epoch in range(args.epochs):
        model.train()
        start, total, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / total:.3f}, train accuracy {correct / total:.3f} "
              f"({time.perf_counter() - start:.1f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.cpu().state_dict(), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
