"""What a run measures: loss, accuracy and the confusion matrix (kept on the device, summed over
processes), the optimizer steps' gradient norm, wall time that waits for the GPU, peak GPU
memory, and the device's name."""
import platform
import time

import torch

from distributed import all_gather_lists, all_reduce_sum, is_main_process


class ClassificationMeter:
    """Accumulates loss, accuracy and a confusion matrix on the device, so that the training
    loop never waits for the GPU; `compute()` is the only place that syncs."""

    def __init__(self, num_classes, device):
        self.num_classes = num_classes
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, loss, logits, targets):
        """`loss` is the batch mean; rows of the confusion matrix are true classes."""
        self.loss_sum += loss.detach().double() * targets.numel()
        pairs = targets * self.num_classes + logits.argmax(dim=1)
        self.confusion += torch.bincount(pairs, minlength=self.num_classes ** 2)

    def state_dict(self):
        """The sums over all processes (a collective under DDP)."""
        return {"loss_sum": all_reduce_sum(self.loss_sum.clone()).cpu(),
                "confusion": all_reduce_sum(self.confusion.clone()).cpu()}

    def load_state_dict(self, state):
        """Rank 0 takes the saved sums and the other ranks start from zero, so they count once."""
        if is_main_process():
            self.loss_sum.copy_(state["loss_sum"])
            self.confusion.copy_(state["confusion"])

    def compute(self):
        """Loss, accuracy (percent), count and confusion matrix summed over all processes."""
        loss_sum = all_reduce_sum(self.loss_sum.clone())
        confusion = all_reduce_sum(self.confusion.clone()).view(self.num_classes, -1).cpu()
        count = int(confusion.sum())
        correct = int(confusion.diag().sum())
        return {
            "loss": float(loss_sum) / max(count, 1),
            "acc": 100.0 * correct / max(count, 1),
            "count": count,
            "confusion": confusion,
        }


class ImagePredictions:
    """Each evaluated image's true class, predicted class and confidence (the softmax probability
    of the prediction), kept on the device in loader order; `rows()` names them by file and
    gathers every process's share."""

    def __init__(self, files):
        self.files = files  # this process's images, in the order its loader yields them (loader_files)
        self.batches = []

    @torch.no_grad()
    def update(self, logits, targets):
        confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
        self.batches.append(torch.stack([targets.double(), predicted.double(), confidence.double()], dim=1))

    def rows(self):
        """[(file, true class index, predicted class index, confidence)] of all processes,
        sorted by file, each file once (a collective under DDP)."""
        values = torch.cat(self.batches).cpu().tolist() if self.batches else []
        if len(values) != len(self.files):
            raise RuntimeError(f"{len(values)} predictions for {len(self.files)} files")
        mine = [(file, int(true), int(predicted), confidence) for file, (true, predicted, confidence)
                in zip(self.files, values)]
        return sorted(dict((row[0], row) for row in all_gather_lists(mine)).values())


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock seconds that include the GPU work queued before `stop()`."""

    def __init__(self, device):
        self.device = device
        synchronize(device)
        self.start = time.perf_counter()

    def stop(self):
        synchronize(self.device)
        return time.perf_counter() - self.start

    def elapsed(self):
        """Seconds so far, without waiting for the GPU (for checkpoints, not for benchmarks)."""
        return time.perf_counter() - self.start


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device):
    """Peak CUDA memory allocated by tensors since the last reset, or None on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


class GradNormMeter:
    """The mean and max of the optimizer steps' true global gradient norms, kept on the device.
    Steps whose gradients overflowed (inf/NaN: GradScaler skips them) are left out. Under DDP
    every rank holds the same averaged gradients, so nothing is summed over processes."""

    def __init__(self, device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.max = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, grad_norm):
        finite = torch.isfinite(grad_norm)
        value = torch.where(finite, grad_norm.double(), 0.0)
        self.total += value
        self.count += finite
        torch.maximum(self.max, value, out=self.max)

    def state_dict(self):
        return {"total": self.total.cpu(), "count": self.count.cpu(), "max": self.max.cpu()}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).copy_(value)

    def compute(self):
        """(mean, max) of the finite norms, or (None, None) if there were none."""
        count = int(self.count)
        return (float(self.total) / count, float(self.max)) if count else (None, None)
