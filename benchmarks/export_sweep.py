"""Does every model --model trains export? Each classification model of torchvision, random init, at
the smallest size it takes (32 px where it can), goes through --export's own functions: the
ONNX export (export.export_onnx, behind the uint8-in Deployable), onnxruntime against PyTorch on
random uint8 batches of 1 and 3 images, and with --int8 the INT8 quantization (2 calibration
batches). One model per subprocess (a crash or a hang is that model's result), one JSON line each.

    python benchmarks/export_sweep.py                          # all of them (an hour or more on 2 cores)
    python benchmarks/export_sweep.py --int8 resnet50          # also quantize (minutes for large models)
    python benchmarks/export_sweep.py resnet18 vit_b_16        # some
    python benchmarks/export_sweep.py --table sweep.jsonl      # the markdown table of a finished sweep
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sweep_one(name, int8):
    """One model's result, as a dict (run in its own process)."""
    import numpy as np
    import torch

    import export
    import inference
    from model import REFERENCE_SIZE, image_size_problem, new_model
    from utils import UserError

    torch.manual_seed(0)
    size = next(s for s in (32, 64, 96, 128, REFERENCE_SIZE) if not image_size_problem(name, s))
    cfg = argparse.Namespace(
        model=name, image_size=size, random_crop=None, checkpoint_name="sweep", device="cpu", channels_last=False
    )
    best = {"class_names": ["a", "b", "c"], "epoch": 0, "weights": "raw"}
    result = {"model": name, "size": size}
    model = new_model(name, 3).eval()
    start = time.perf_counter()
    try:
        export.check_file_limit(model, name)
        data = export.export_onnx(model, cfg, export.metadata(cfg, best))
    except UserError as exc:
        return {**result, "export": str(exc)}
    result.update(export="ok", export_seconds=round(time.perf_counter() - start, 1), onnx_mb=round(len(data) / 1e6, 1))
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    runner, reference = inference.OnnxRunner(data), inference.PyTorchRunner(model, cfg)
    diffs = []
    for batch in (images[:1], images):  # the dynamic batch dimension
        got, expected = runner(batch), reference(batch)
        diffs.append(float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30)))
    result["max_relative_logit_diff"] = max(diffs)
    if not int8:
        return result
    start = time.perf_counter()
    try:
        int8 = export.quantize_int8(data, [images[:2].numpy(), images[1:].numpy()], {"precision": "int8"})
        inference.OnnxRunner(int8)(images[:1])
        result.update(int8="ok", int8_mb=round(len(int8) / 1e6, 1), int8_seconds=round(time.perf_counter() - start, 1))
    except Exception as exc:
        result["int8"] = f"{type(exc).__name__}: {export.first_line(exc)}"
    return result


def table(lines):
    rows = [
        "| model | px | export | s | max rel. logit diff | ONNX MB | INT8 | INT8 MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in lines:
        rows.append(
            f"| {r['model']} | {r.get('size', '')} | {r['export']} | {r.get('export_seconds', '')} | "
            f"{r.get('max_relative_logit_diff', float('nan')):.1e} | {r.get('onnx_mb', '')} | "
            f"{r.get('int8', '')} | {r.get('int8_mb', '')} |"
        )
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("models", nargs="*", help="model names (default: every classification model of torchvision)")
    p.add_argument("--out", default="export_sweep.jsonl", help="where to append the JSON lines")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    p.add_argument("--table", metavar="JSONL", help="print the markdown table of a finished sweep and stop")
    p.add_argument("--int8", action="store_true", help="also quantize each model to INT8")
    p.add_argument("--one", help=argparse.SUPPRESS)  # (the subprocess's own job)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(sweep_one(args.one, args.int8)))
        return 0
    if args.table:
        with open(args.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return 0
    import torchvision

    names = args.models or torchvision.models.list_models(module=torchvision.models)
    for name in names:
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--one", name, *(["--int8"] if args.int8 else [])],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            result = (
                json.loads(lines[-1])
                if lines
                else {"model": name, "export": f"crashed (exit {done.returncode}): {done.stderr.strip()[-300:]}"}
            )
        except subprocess.TimeoutExpired:
            result = {"model": name, "export": f"timed out after {args.timeout:.0f} s"}
        print(json.dumps(result), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
