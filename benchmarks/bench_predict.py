"""End to end: ``seg predict`` beside two MONAI pipelines, on real-size scans of several lengths along z.

Rows, each in a fresh process (imports, model loading, reading and writing included; wall clock, and peak
resident memory from ``wait4``):

- ``seg predict``: the paper-size V-Net of ``seg run finetune -e flare22-pcrl-vnet --epochs 0`` (untrained:
  timing only), the experiment's preprocessing (crop to the body, 160 x 160 x 2.5 mm, clip and z-score),
  ``z_sliding_window`` (80 slices, overlap 0.5, Gaussian blending, ``stretch`` 1.25), the inverse onto the
  input grid, an atomic write.
- ``same network in MONAI``: the same run's network and weights, built by the ``vnet`` plugin and
  ``load_state_dict`` in plain eval mode (no ``for_inference()`` batch-norm folding), through MONAI's
  ``sliding_window_inference`` with the paper's window (80 x 160 x 160), overlap 0.5 and Gaussian blending of
  the softmax probabilities (padding with the image minimum, as seg pads), ``argmax``; seg's reader,
  preprocessing, label inverse and writer. Only the inference engineering differs: batch norms folded, the
  window stretched when that forwards fewer slices, the blend held for one window's span with the argmax
  taken slice by slice (one window: the argmax of the logits), the image read while the model loads. Both
  networks keep the ``vnet`` plugin's own layers (matrix-product head and up-convolutions, in-place PReLU).
- ``MONAI VNet pipeline``: what a MONAI user would run instead: SimpleITK read, B-spline resampling of the
  whole field of view to the same grid, the same clip and z-score, MONAI's ``VNet`` (widths 16 to 256,
  untrained), the same ``sliding_window_inference``, ``argmax``, nearest-neighbour resampling back, SimpleITK
  write. Its network costs more per slice (a 5x5x5 output convolution), so this ratio is not engineering only.

Scans: one phantom of ``seg data synth --size full`` (seed 0, case 14: 512 x 512, 0.75 mm pixels, 537 mm of
body at 2.97 mm slices, identity direction), centred on its abdominal organs and resampled along z (linear
for the image, nearest for the labels) to ``--lengths`` mm of body at ``--z-spacing`` mm (default 1.6 mm:
208 mm is 130 slices, 336 mm 210, 500 mm 312); slices beyond the phantom's ends would repeat it mirrored.

Per row and length the table gives windows run, slices forwarded (each window's depth, every slice whole),
the network's own seconds (summed over its forward calls; the softmax and blending are outside) and the G
multiply-accumulates per second achieved, from the network's MACs per voxel counted from its (transposed)
convolution layers as ``tests/test_vnet.py`` does (690.7 G per 80 x 160 x 160 window for seg's V-Net, 813.1 G
for MONAI's). Ratios are seg / row (wall time, peak RSS); targets: <= 0.5 of
the MONAI VNet pipeline, <= 0.75 of the same network in MONAI, seg's peak RSS <= 2048 MB.

Accuracy (``--model RUN``, a trained fine-tuning run such as ``seg run finetune -e phantom-scratch-vnet``):
on each scan, the labels of seg's predictor (``seg predict``'s code) against the same network through MONAI's
paper-window inference (its experiment's window, overlap 0.5, Gaussian), both with seg's preprocessing and
inverse; the share of voxels that agree (target >= 99.5 %), that share among voxels either calls an organ,
and each one's mean Dice against the phantom's labels. At the experiment's window and at twice it
(``--windows``): ``stretch`` can never grow the phantom experiments' 32-slice window (32 x 1.25 < 32 + 16),
it can grow a 64-slice one to 80. A scan shorter than the window is padded at its far end by seg and on both
sides by MONAI, and the network's output depends on where the padding is: for such scans a last column gives
the agreement with MONAI run on the input already padded at its end.

    python benchmarks/bench_predict.py                          # 208, 336 and 500 mm: about 10 minutes on 2 cores
    python benchmarks/bench_predict.py --model RUN              # adds the accuracy check with a trained run
    python benchmarks/bench_predict.py --quick                  # every row and the check at tiny size (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING = (0.57, 0.57, 1.6)
IDENTITY = [1, 0, 0, 0, 1, 0, 0, 0, 1]
LONG_PHANTOM = (0, 14)  # seed, case: a labeled "full" phantom covering 537 mm
ABDOMEN = [1, 2, 3, 4, 7, 8, 9, 11, 12, 13]  # FLARE22 organs without the aorta, IVC and esophagus
ROWS = {"seg": "seg predict", "same": "same network in MONAI", "monai": "MONAI VNet pipeline"}


def make_scan(path: Path, slices: int) -> None:
    """A 512 x 512 phantom (seed 0, case 0) of ``slices`` slices, cut or mirror-repeated along z, 1.6 mm apart
    (``benchmarks/gpu_check.py``'s scan)."""
    from seg.core.synth import synthetic_case

    image, _ = synthetic_case(0, 0, True, "full", direction=IDENTITY)
    array = sitk.GetArrayFromImage(image)
    if len(array) >= slices:
        start = (len(array) - slices) // 2
        array = array[start:start + slices]
    else:  # mirror-repeat: no seams, anatomy of a (strange) long scan
        period = np.concatenate([np.arange(len(array)), np.arange(len(array))[::-1]])
        array = array[period[np.arange(slices) % len(period)]]
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing(SPACING)
    out.SetOrigin((-146.0, -146.0, -100.0))
    sitk.WriteImage(out, str(path), useCompression=True)


def body_scans(folder: Path, lengths: list[int], z_spacing: float, size: str) -> dict[int, tuple[Path, Path]]:
    """(scan, label map) files of ``lengths`` mm of body each (module docstring), keyed by length."""
    from seg.core.synth import synthetic_case

    image, label = synthetic_case(*LONG_PHANTOM, True, size, direction=IDENTITY)
    hu, truth = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    (sx, sy, sz), (ox, oy, oz) = image.GetSpacing(), image.GetOrigin()
    organ = np.flatnonzero(np.isin(truth, ABDOMEN).any(axis=(1, 2)))
    centre = oz + sz * (organ[0] + organ[-1]) / 2
    last, scans = len(hu) - 1, {}
    for length in lengths:
        n = max(1, round(length / z_spacing))
        z = centre + (np.arange(n) - (n - 1) / 2) * z_spacing
        position = np.abs((z - oz) / sz) % (2 * last)  # source slice index, mirrored at both ends
        position = np.where(position > last, 2 * last - position, position)
        below = np.minimum(np.floor(position).astype(int), last - 1)
        weight = (position - below).astype(np.float32)
        array = np.empty((n, *hu.shape[1:]), np.int16)
        for k in range(n):
            array[k] = np.rint((1 - weight[k]) * hu[below[k]] + weight[k] * hu[below[k] + 1])
        paths = folder / f"scan{length}.nii.gz", folder / f"truth{length}.nii.gz"
        for values, path in ((array, paths[0]), (truth[np.rint(position).astype(int)], paths[1])):
            out = sitk.GetImageFromArray(values)
            out.SetSpacing((sx, sy, z_spacing))
            out.SetOrigin((ox, oy, float(z[0])))
            sitk.WriteImage(out, str(path), useCompression=True)
        scans[length] = paths
    return scans


def make_model(folder: Path, experiment: str) -> Path:
    """A fine-tuning run folder from ``seg run finetune --epochs 0`` on two small phantoms."""
    data, run = folder / "data", folder / "run"
    for args in (["data", "synth", str(data), "--labeled", "2", "--unlabeled", "0"],
                 ["run", "finetune", "-e", experiment, "--data", str(data), "--out", str(run), "--epochs", "0",
                  "--device", "cpu"]):
        subprocess.run([sys.executable, "-m", "seg", "-q", *args], check=True)
    return run


class Counter:
    """Windows, slices (batch x depth) and seconds of a network's forward calls."""

    def __init__(self):
        self.windows = self.slices = 0
        self.seconds = 0.0
        self.plane = None
        self._start = 0.0

    def add(self, batch, seconds: float) -> None:
        self.windows += batch.shape[0]
        self.slices += batch.shape[0] * batch.shape[2]
        self.plane = list(batch.shape[3:])
        self.seconds += seconds

    def timed(self, network):
        """``network`` as a function that counts its calls."""
        def call(batch):
            start = time.perf_counter()
            out = network(batch)
            self.add(batch, time.perf_counter() - start)
            return out
        return call

    def hook(self, module) -> None:
        """Count ``module``'s forward calls."""
        module.register_forward_pre_hook(lambda m, args: setattr(self, "_start", time.perf_counter()))
        module.register_forward_hook(lambda m, args, out: self.add(args[0], time.perf_counter() - self._start))

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps({"windows": self.windows, "slices": self.slices, "plane": self.plane,
                                          "network_s": self.seconds}))


def plain_network(run: Path):
    """The run's network built by its backbone plugin, its weights loaded, in eval mode; and the run's model."""
    from seg.core import plugins
    from seg.core.modelfile import load_model

    model = load_model(run)
    choice = model.experiment.backbone
    network = plugins.get("backbones", choice.name)(1, model.backbone["out_channels"], **choice.options)
    network.load_state_dict(model.weights)
    return network.eval(), model


def paper_window_labels(network, image, window: int, counter: Counter | None = None) -> np.ndarray:
    """uint8 labels (z, y, x) of ``image`` (1, 1, z, y, x) by MONAI's sliding window of ``window`` slices by
    the whole slice (rounded up to 16), overlap 0.5, Gaussian blending of softmax probabilities."""
    import torch
    from monai.inferers import sliding_window_inference

    roi = (window, *(-(-n // 16) * 16 for n in image.shape[3:]))
    forward = counter.timed(network) if counter else network
    with torch.inference_mode():
        probs = sliding_window_inference(image, roi, 1, lambda x: torch.softmax(forward(x), 1), overlap=0.5,
                                         mode="gaussian", cval=float(image.min()))
    return probs[0].argmax(0).to(torch.uint8).numpy()


def worker(row: str, scan: str, out: str, run: str, stats: str, params: dict) -> None:
    """One row (module docstring) on one scan, counting the network's calls into ``stats``."""
    import torch

    counter = Counter()
    if row == "seg":
        import seg.core.predict as predict_module
        from seg.cli import main

        load = predict_module.load_predictor

        def counted(*args, **kwargs):
            predictor = load(*args, **kwargs)
            counter.hook(predictor.network)
            return predictor

        predict_module.load_predictor = counted
        main(["-q", "predict", "-i", scan, "-o", out, "--model", run, "--device", "cpu"])
    elif row == "same":
        from seg.core.io import read_image, write_image
        from seg.core.preprocessing import Sample, build_pipeline, invert_labels, run_pipeline, to_array

        network, model = plain_network(Path(run))
        pipeline = build_pipeline([(c.name, dict(c.options)) for c in model.experiment.preprocess])
        sample, records = run_pipeline(pipeline, Sample(read_image(scan)))
        image = torch.from_numpy(to_array(sample.image))[None, None]
        del sample
        labels = paper_window_labels(network, image, params["window"], counter)
        write_image(invert_labels(pipeline, labels, records), out)
    else:
        from monai.networks.nets import VNet

        image = sitk.ReadImage(scan)
        size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
        new_size = [*params["in_plane"], int(round(size[2] * spacing[2] / params["z_spacing"]))]
        new_spacing = size * spacing / new_size
        direction = np.array(image.GetDirection()).reshape(3, 3)
        origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - spacing) / 2)  # same field of view
        small = sitk.Resample(image, [int(n) for n in new_size], sitk.Transform(), sitk.sitkBSpline,
                              origin.tolist(), new_spacing.tolist(), image.GetDirection(), -1000.0, sitk.sitkFloat32)
        array = np.clip(sitk.GetArrayFromImage(small), params["low"], params["high"])
        array = (array - array.mean()) / max(array.std(), 1e-8)
        network = VNet(spatial_dims=3, in_channels=1, out_channels=params["classes"]).eval()
        labels = sitk.GetImageFromArray(paper_window_labels(network, torch.from_numpy(array)[None, None],
                                                            params["window"], counter))
        labels.CopyInformation(small)
        back = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        sitk.WriteImage(back, out, useCompression=True)
    counter.save(stats)


def macs_per_voxel(network_factory) -> float:
    """Multiply-accumulates per input voxel of a fully convolutional network (``seg.core.model.count_macs`` on a
    meta-device forward pass; exact for sizes divisible by 16)."""
    import torch

    from seg.core.model import count_macs

    with torch.device("meta"):
        network = network_factory().eval()
    shape = (1, 16, 32, 32)
    return count_macs(network, shape) / math.prod(shape)


def measured(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MB) of ``command`` run in its own process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(command)}")
    return seconds, usage.ru_maxrss / 1024


def same_grid(a: Path, b: Path) -> bool:
    """Whether two image files have the same size, spacing, origin and direction."""
    ra, rb = sitk.ImageFileReader(), sitk.ImageFileReader()
    for reader, path in ((ra, a), (rb, b)):
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    return ra.GetSize() == rb.GetSize() and np.allclose(ra.GetSpacing(), rb.GetSpacing()) and \
        np.allclose(ra.GetOrigin(), rb.GetOrigin()) and np.allclose(ra.GetDirection(), rb.GetDirection())


def mean_dice(labels: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the organs present in ``truth``."""
    k = int(max(labels.max(), truth.max())) + 1
    joint = np.bincount(truth.ravel().astype(np.int64) * k + labels.ravel(), minlength=k * k).reshape(k, k)
    organs = [c for c in range(1, k) if joint[c].sum()]
    return float(np.mean([2 * joint[c, c] / (joint[c].sum() + joint[:, c].sum()) for c in organs]))


def accuracy(run: Path, scans: dict, windows: list[int]) -> None:
    """seg's labels against the paper-window inference of the same network, per scan and window."""
    import attrs
    import torch

    from seg.core import plugins
    from seg.core.io import read_image
    from seg.core.predict import load_predictor
    from seg.core.preprocessing import invert_labels

    predictor = load_predictor(run, device="cpu")
    network, _ = plain_network(run)
    inferer = predictor.experiment.predict.inferer
    print(f"\naccuracy, {run}: seg predict's labels vs the paper-window inference of the same network "
          f"(target: agree on >= 99.5 % of voxels)")
    print(f"{'length':>7} {'window':>6} {'agree %':>8} {'agree % (organs)':>17} {'Dice seg':>9} {'Dice paper':>11} "
          f"{'agree %, MONAI padded at the end':>33}")
    for length, (scan, truth_path) in scans.items():
        image = read_image(scan)
        truth = sitk.GetArrayFromImage(read_image(truth_path))
        tensor, records = predictor.preprocess(image)
        depth = tensor.shape[2]
        for window in windows:
            ours = attrs.evolve(predictor, inferer=plugins.get("inferers", inferer.name)(
                **{**inferer.options, "window": window}))
            a = sitk.GetArrayFromImage(ours.segment(tensor, records)[0])
            b = sitk.GetArrayFromImage(invert_labels(predictor.pipeline, paper_window_labels(
                network, tensor, window), records))
            same, either = a == b, (a > 0) | (b > 0)
            padded = "-"  # a scan shorter than the window: MONAI pads both ends, seg the far end only
            if depth < window:
                x = torch.nn.functional.pad(tensor, (0, 0, 0, 0, 0, window - depth), value=float(tensor.min()))
                c = invert_labels(predictor.pipeline, paper_window_labels(network, x, window)[:depth], records)
                padded = f"{100 * (a == sitk.GetArrayFromImage(c)).mean():.3f}"
            print(f"{length:>4} mm {window:>6} {100 * same.mean():8.3f} {100 * same[either].mean():17.2f} "
                  f"{mean_dice(a, truth):9.3f} {mean_dice(b, truth):11.3f} {padded:>33}", flush=True)


def main() -> None:
    """Build the inputs, run the rows per length, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="208,336,500", help="mm of body along z, comma-separated")
    parser.add_argument("--z-spacing", type=float, default=1.6, help="slice spacing of the scans (mm)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest counts")
    parser.add_argument("--model", type=Path, help="a trained fine-tuning run: adds the accuracy check")
    parser.add_argument("--windows", help="accuracy check windows, comma-separated (default: the model's, twice it)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: smoke network, small phantom, 120 and 240 mm at 4 mm slices")
    parser.add_argument("--worker", nargs=6, metavar=("ROW", "SCAN", "OUT", "RUN", "STATS", "PARAMS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker[:5], json.loads(args.worker[5]))
        return
    import torch

    from seg.core.modelfile import load_model

    if args.quick:  # small phantoms, slices 4 mm apart, unless given
        args.lengths = "120,240" if args.lengths == parser.get_default("lengths") else args.lengths
        args.z_spacing = 4.0 if args.z_spacing == parser.get_default("z_spacing") else args.z_spacing
    lengths = [int(v) for v in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = make_model(tmp, "smoke" if args.quick else "flare22-pcrl-vnet")
        model = load_model(run)
        exp, classes = model.experiment, model.backbone["out_channels"]
        steps = {c.name: c.options for c in exp.preprocess}
        params = {"in_plane": list(steps["resample"]["in_plane"]), "z_spacing": steps["resample"]["z_spacing"],
                  "low": steps["clip_zscore"]["low"], "high": steps["clip_zscore"]["high"],
                  "window": exp.predict.inferer.options["window"], "classes": classes}
        from monai.networks.nets import VNet as MonaiVNet

        from seg.core import plugins

        ours = macs_per_voxel(lambda: plugins.get("backbones", exp.backbone.name)(1, classes, **exp.backbone.options))
        theirs = macs_per_voxel(lambda: MonaiVNet(spatial_dims=3, in_channels=1, out_channels=classes))
        macs = {"seg": ours, "same": ours, "monai": theirs}
        started = time.perf_counter()
        scans = body_scans(tmp, lengths, args.z_spacing, "small" if args.quick else "full")
        print(f"scans built in {time.perf_counter() - started:.0f} s; torch threads {torch.get_num_threads()}; "
              f"G MACs per 80-slice window of {params['in_plane'][0]} x {params['in_plane'][1]}: seg's V-Net "
              f"{ours * 80 * math.prod(params['in_plane']) / 1e9:.1f}, MONAI's "
              f"{theirs * 80 * math.prod(params['in_plane']) / 1e9:.1f}", flush=True)
        results = {}
        for length, (scan, _) in scans.items():
            best = {}
            for _ in range(args.repeat):
                for row in ROWS:
                    out, stats = tmp / f"{row}.nii.gz", tmp / f"{row}.json"
                    wall, rss = measured([sys.executable, __file__, "--worker", row, str(scan), str(out),
                                          str(run), str(stats), json.dumps(params)])
                    if not same_grid(out, scan):
                        raise SystemExit(f"{ROWS[row]}: the label map is not on the input's grid")
                    out.unlink()
                    if row not in best or wall < best[row]["wall"]:
                        best[row] = {"wall": wall, "rss": rss, **json.loads(stats.read_text())}
            results[length] = best
            report(length, scan, best, macs)
        summary(results)
        if args.model or args.quick:
            run_model = args.model or run  # quick without --model: the untrained smoke run checks the code path
            window = load_model(run_model).experiment.predict.inferer.options["window"]
            accuracy(run_model, scans, [int(w) for w in args.windows.split(",")] if args.windows else
                     [window, 2 * window])
            if not args.model:
                print("(--quick without --model: an untrained network, whose near-ties make these figures meaningless)")
        else:
            print("\naccuracy: not measured (give --model RUN, a trained fine-tuning run)")


def report(length: int, scan: Path, best: dict, macs: dict) -> None:
    """One length's table and ratios."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(scan))
    reader.ReadImageInformation()
    size = reader.GetSize()
    print(f"\n{length} mm of body: {size[0]} x {size[1]} x {size[2]} voxels")
    print(f"  {'row':<24}{'wall s':>8}{'peak MB':>9}{'windows':>9}{'slices':>8}{'net s':>8}"
          f"{'GMAC/s net':>12}{'GMAC/s wall':>13}")
    for row, r in best.items():
        gmac = r["slices"] * math.prod(r["plane"] or [0]) * macs[row] / 1e9
        print(f"  {ROWS[row]:<24}{r['wall']:8.1f}{r['rss']:9.0f}{r['windows']:9d}{r['slices']:8d}"
              f"{r['network_s']:8.1f}{gmac / max(r['network_s'], 1e-9):12.1f}{gmac / r['wall']:13.1f}")
    seg = best["seg"]
    for row, target in (("monai", 0.5), ("same", 0.75)):
        print(f"  seg / {ROWS[row]:<22} wall {seg['wall'] / best[row]['wall']:.2f} (target <= {target}), "
              f"peak RSS {seg['rss'] / best[row]['rss']:.2f}")


def summary(results: dict) -> None:
    """Both ratios across lengths, seg's peak RSS, and a CPU peak for scale."""
    print(f"\n{'length':>7} {'seg / MONAI VNet (<= 0.5)':>26} {'seg / same network (<= 0.75)':>29} "
          f"{'seg peak MB (<= 2048)':>22}")
    for length, best in results.items():
        seg = best["seg"]
        print(f"{length:>4} mm {seg['wall'] / best['monai']['wall']:26.2f} {seg['wall'] / best['same']['wall']:29.2f}"
              f" {seg['rss']:22.0f}")
    try:
        mhz = float(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("cpu MHz")).split(":")[1])
    except (OSError, StopIteration, ValueError):
        return
    cores = os.cpu_count()
    print(f"for scale: {cores} cores x 16 fp32 MACs per cycle (two 8-lane AVX2 FMA units) x {mhz / 1000:.2f} GHz = "
          f"{cores * 16 * mhz / 1000:.0f} GMAC/s")


if __name__ == "__main__":
    main()
