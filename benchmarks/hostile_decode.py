"""Peak RSS of a validator decoding hostile Δs vs decoding an honest Δ of the same model.

Every input is decoded the way the validator does (``decode_delta(blob, delta_layout(model))``) in a
fresh subprocess, which reports its peak RSS (``VmHWM``: imports + the blob + the decode). The
ratio hostile / honest is printed per case; the target is ≤ 2× (issue #15). Hostile inputs are the
regression corpus of tests/hostile_blobs.py built for the chosen model (a ~1 KB Δ declaring a 10^12-value
tensor, 2^63 and 100 MB header claims, overlapping/out-of-range offsets, F64/BOOL/U8 codes, block
mismatch, nested JSON, ...).

    python benchmarks/hostile_decode.py [--config llama-125m] [--repeats 3] [--cases a,b]

On the debug model (a 0.2 MB Δ) every run peaks at the imports (torch + transformers), so use a real
model size (llama-125m: a 125 MB Δ that decodes to 0.5 GB of fp32) to see the decode itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
from peer.net.layout import ArtifactRefused, ArtifactLayouts
from peer.net.outbox import decode_delta
shapes = {n: tuple(s) for n, s in json.loads(Path(sys.argv[1]).read_text()).items()}
layout = ArtifactLayouts.from_shapes(shapes).contribution
blob = Path(sys.argv[2]).read_bytes()
def hwm_kib():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
before = hwm_kib()
t0 = time.perf_counter()
try:
    out = decode_delta(blob, layout)
    result = "decoded %d tensors" % len(out)
except ArtifactRefused as e:
    result = "refused: " + e.reason
print(json.dumps({"peak_kib": hwm_kib(), "before_kib": before,
                  "seconds": time.perf_counter() - t0, "result": result}))
"""


def run_child(shapes_path: Path, blob_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(shapes_path), str(blob_path)],
        capture_output=True, text=True, env=env, cwd=REPO, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", default="llama-125m", help="model config whose Δ layout the validator expects"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="", help="comma-separated hostile cases to run (default: all)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from peer.config import load_run_config
    from peer.net.layout import model_param_shapes
    from tests.hostile_blobs import honest_delta, hostile_cases

    shapes = model_param_shapes(load_run_config(args.config))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "shapes.json").write_text(json.dumps({n: list(s) for n, s in shapes.items()}))
        inputs = {"honest": honest_delta(shapes), **hostile_cases(shapes)}
        if args.cases:
            keep = {"honest", *args.cases.split(",")}
            inputs = {n: b for n, b in inputs.items() if n in keep}
        for name, blob in inputs.items():
            (tmp / f"{name}.safetensors").write_bytes(blob)
        peaks: dict[str, list[int]] = {n: [] for n in inputs}
        results: dict[str, str] = {}
        for _ in range(args.repeats):
            for name in inputs:  # honest and hostile interleaved: the same load on each
                r = run_child(tmp / "shapes.json", tmp / f"{name}.safetensors")
                peaks[name].append(r["peak_kib"])
                results[name] = r["result"]
        honest_med = statistics.median(peaks["honest"])
        print(f"config {args.config}: honest Δ {len(inputs['honest'])} bytes, {args.repeats} runs each")
        print(
            f"{'input':24} {'bytes':>10} {'peak RSS MiB (median/worst)':>28} {'ratio med/worst':>16}  result"
        )
        worst_ratio = 0.0
        for name, blob in inputs.items():
            med, worst = statistics.median(peaks[name]), max(peaks[name])
            ratio_med, ratio_worst = med / honest_med, worst / honest_med
            if name != "honest":
                worst_ratio = max(worst_ratio, ratio_worst)
            print(
                f"{name:24} {len(blob):>10} {med / 1024:>15.1f} / {worst / 1024:<10.1f} "
                f"{ratio_med:>7.3f} / {ratio_worst:<6.3f}  {results[name]}"
            )
        print(f"worst hostile / honest peak RSS: {worst_ratio:.3f} (target <= 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
