"""A user's own training script, as the people this tool is for write them: the model class, a plain
PyTorch loop on all 60,000 training images with MNIST's normalisation, `nll_loss` on `log_softmax`, and
a bare state_dict at the end. No fashion_ft code: it is the "your own model" of the results table.

    python bench/own_model/mnist-gpu.py --data-dir /usr/share/datasets/fashion-mnist --save mnist_cnn3.pt
"""

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self, width=32, hidden=128, dropout=0.25):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.fc1 = nn.Linear(4 * width, hidden)
        self.bn_fc = nn.BatchNorm1d(hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.dropout(F.relu(self.bn_fc(self.fc1(x))))
        return F.log_softmax(self.fc2(x), dim=1)


def read_idx(path, offset):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load(folder, prefix):
    images = read_idx(Path(folder) / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = read_idx(Path(folder) / f"{prefix}-labels-idx1-ubyte.gz", 8)
    x = (torch.from_numpy(images.copy()).float() / 255 - 0.1307) / 0.3081  # copied from the MNIST example
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def test(model, loader):
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(loader.dataset)


def main():
    parser = argparse.ArgumentParser(description="train a CNN on Fashion-MNIST")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save", default="mnist_cnn3.pt")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_loader = DataLoader(load(args.data_dir, "train"), batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(load(args.data_dir, "t10k"), batch_size=1000)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.3)
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            F.nll_loss(model(x), y).backward()
            optimizer.step()
        scheduler.step()
        print(f"epoch {epoch}: test accuracy {100 * test(model, test_loader):.2f}% ({time.time() - start:.0f} s)",
              flush=True)
    torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
