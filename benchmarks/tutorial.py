"""The tutorial's own pipeline, as its text writes it (../shared/seeds: OneFlow's transfer-learning
tutorial), on in-memory images, for the benchmarks to run side by side with TransferLab:
per-image PIL transforms (flips, Resize, ToTensor, Normalize) in a DataLoader, a FlowVision
ResNet-18 with a new head, SGD (lr 1e-3, momentum 0.9, weight decay 5e-4) in its three ways, its
train loop and its evaluate.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def loader(images: np.ndarray, labels: np.ndarray, size: int, train: bool, batch_size: int = 64,
           workers: int = 4) -> Any:
    """Its DataLoader over uint8 N x H x W x 3 images: the train transform (random horizontal and
    vertical flips, Resize, ToTensor, Normalize) or the test one (Resize, ToTensor, Normalize)."""
    import flowvision.transforms as transforms
    from oneflow.utils.data import DataLoader, Dataset
    from PIL import Image

    flips = [transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip()] if train else []
    transform = transforms.Compose(flips + [transforms.Resize(size), transforms.ToTensor(),
                                            transforms.Normalize(MEAN, STD)])

    class Arrays(Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int) -> Tuple[Any, int]:
            return transform(Image.fromarray(images[i])), int(labels[i])

    return DataLoader(Arrays(), batch_size=batch_size, shuffle=train, num_workers=workers)


def model_and_optimizer(way: int, classes: int) -> Tuple[Any, Any]:
    """ResNet-18 (random weights: nothing is downloaded here) with a `classes`-way head, and the
    optimizer of the tutorial's way 1 (everything), 2 (backbone 1e-4, head 1e-3) or 3 (the head's
    parameters only: the backbone still computes its gradients, as in the tutorial)."""
    import oneflow as flow
    from flowvision.models import resnet18
    from oneflow import nn

    model = resnet18()
    model.fc = nn.Linear(model.fc.in_features, classes)
    sgd = dict(momentum=0.9, weight_decay=5e-4)
    if way == 1:
        optimizer = flow.optim.SGD(model.parameters(), lr=0.001, **sgd)
    elif way == 2:
        fc_params = list(map(id, model.fc.parameters()))
        backbone_params = filter(lambda p: id(p) not in fc_params, model.parameters())
        optimizer = flow.optim.SGD([{"params": backbone_params, "lr": 0.0001},
                                    {"params": model.fc.parameters(), "lr": 0.001}], **sgd)
    else:
        optimizer = flow.optim.SGD(model.fc.parameters(), lr=0.001, **sgd)
    return model, optimizer


def train_epoch(model: Any, data_loader: Any, optimizer: Any, loss_func: Any) -> float:
    """One epoch of the tutorial's train_model loop (its model.train(), step and no other
    synchronisation than its own: the loss it prints every 100 batches); the last loss."""
    model.train()
    for batch, (images, labels) in enumerate(data_loader):
        preds = model(images)
        loss = loss_func(preds, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if batch % 100 == 0:
            loss.numpy()  # its print(f"loss: {loss:>7f} ...")
    return float(loss.numpy())


def evaluate(model: Any, data_loader: Any) -> float:
    """The tutorial's evaluate: test accuracy."""
    import oneflow as flow

    model.eval()
    num_corrects = 0
    for images, labels in data_loader:
        preds = model(images)
        num_corrects += flow.sum(flow.argmax(preds, dim=1) == labels)
    return num_corrects.item() / len(data_loader.dataset)
