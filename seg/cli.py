"""The ``seg`` command line: parse options, call the core, render with rich. No logic a test would need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from seg import __version__
from seg.core.console import console, set_quiet
from seg.core.errors import SegError
from seg.entry import missing_package_line

EXPERIMENT_HELP = "registry experiment name, or a TOML file such as a run's config.toml"
SET_HELP = "override a dotted config key, e.g. finetune.optimizer.lr=3e-4 (repeatable)"


def _experiment(name: str, overrides: tuple[str, ...], **choices):
    """Load an experiment with ``--set`` overrides and the ``--backbone``/``--ssl`` shortcuts (choosing a
    different plugin than the experiment's resets that plugin's options)."""
    from seg.core.config import load_experiment

    exp = load_experiment(name)
    current = {"backbone": exp.backbone.name, "pretrain.ssl": exp.pretrain.ssl.name if exp.pretrain else None}
    shortcuts = []
    for key, value in choices.items():
        if value and value != current[key]:
            shortcuts += [f"{key}.options={{}}", f"{key}.name={json.dumps(value)}"]
    return load_experiment(name, (*shortcuts, *overrides))


def _relaunch_with_torchrun(nproc: int) -> None:
    """Re-run this very command under torchrun with ``nproc`` processes, without ``--nproc``."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "seg", *args]
    raise SystemExit(subprocess.call(command))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="seg")
@click.option("--debug", is_flag=True, help="show tracebacks for errors")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or informational messages")
@click.pass_context
def cli(ctx, debug, quiet):
    """seg: plugin-based 3D CT organ segmentation (PCRL-pretrained V-Net, FLARE22)."""
    ctx.obj = {"debug": debug}
    set_quiet(quiet)


@cli.group()
def data():
    """Datasets: synthesize phantoms, check a dataset, preprocess it into the cache."""


@data.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--labeled", default=8, show_default=True, help="labeled cases (imagesTr + labelsTr)")
@click.option("--unlabeled", default=16, show_default=True, help="unlabeled cases (unlabeled/)")
@click.option("--test", default=0, show_default=True, help="held-out labeled cases (imagesTs + labelsTs)")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", type=click.Choice(["small", "full"]), default="small", show_default=True,
              help="small: ~100^2 voxels a slice; full: 512^2 at 0.7-0.9 mm")
def data_synth(out, labeled, unlabeled, test, seed, size):
    """Write a dataset of synthetic abdominal CT phantoms to OUT (nnU-Net layout, 13 FLARE22 organs)."""
    from seg.core.console import progress_bar
    from seg.core.synth import write_synthetic_dataset

    with progress_bar("synthesizing", labeled + unlabeled + test) as advance:
        write_synthetic_dataset(out, labeled, unlabeled, seed=seed, size=size, progress=advance, test=test)
    console.print(f"wrote {labeled} labeled, {unlabeled} unlabeled and {test} test phantoms to {out}")


@data.command("check")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--unlabeled-dir", default="unlabeled", show_default=True, help="folder of unlabeled scans")
def data_check(data_dir, unlabeled_dir):
    """Verify a dataset before compute is spent on it; exit 1 if any problem is found."""
    from seg.core.check import check_dataset, render_problems
    from seg.core.errors import CheckFailed

    problems = check_dataset(data_dir, unlabeled_dir=unlabeled_dir)
    if len(problems) == 1 and problems[0].file == str(data_dir):
        raise SegError(f"{data_dir}: {problems[0].problem}")
    if problems:
        console.print(render_problems(problems))
        raise CheckFailed(f"{data_dir}: {len(problems)} problem(s), {sum(p.fatal for p in problems)} fatal")
    console.print(f"[green]{data_dir}: no problems found")


@data.command("prepare")
@click.argument("data_dir", metavar="DATA", type=click.Path(path_type=Path))
@click.option("--experiment", "-e", default="flare22-pcrl-vnet", show_default=True, help=EXPERIMENT_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--workers", default=1, show_default=True, help="parallel worker processes")
def data_prepare(data_dir, experiment, overrides, workers):
    """Preprocess every case of DATA once into its cache (resumable; skips what is done)."""
    from seg.core import cache
    from seg.core.console import progress_bar
    from seg.core.data import checked_dataset, preprocess_steps

    exp = _experiment(experiment, overrides)
    dataset = checked_dataset(data_dir, exp)
    cases = [*dataset.training, *dataset.unlabeled, *dataset.test]
    steps = preprocess_steps(exp)
    cache_dir = cache.default_cache_dir(data_dir, steps)
    with progress_bar("preprocessing", len(cases)) as advance:
        skipped = cache.prepare(cases, cache_dir, steps, workers=workers, progress=advance)
    for _, error in skipped:
        console.print(f"[yellow]skipped unreadable scan {escape(str(error))}", highlight=False)  # names the file
    console.print(f"cache: {cache_dir} ({len(cases) - len(skipped)} cases)")


@cli.group()
def run():
    """Training stages: self-supervised pretraining, supervised fine-tuning."""


def _stage_options(func):
    for option in reversed([
        click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="dataset folder"),
        click.option("--out", required=True, type=click.Path(path_type=Path), help="run folder to write"),
        click.option("--experiment", "-e", default="flare22-pcrl-vnet", show_default=True, help=EXPERIMENT_HELP),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP),
        click.option("--backbone", default=None, help="backbone plugin name (overrides the experiment's)"),
        click.option("--resume", is_flag=True, help="continue the run in --out from its latest checkpoint"),
        click.option("--epochs", type=int, default=None, help="override the number of epochs (0: initialise only)"),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--workers", default=1, show_default=True, help="preprocessing worker processes"),
        click.option("--nproc", type=int, default=None, help="processes (GPUs) via torchrun, DistributedDataParallel"),
    ]):
        func = option(func)
    return func


@run.command("pretrain")
@_stage_options
@click.option("--ssl", default=None, help="SSL task plugin name (overrides the experiment's), e.g. pcrl")
def run_pretrain(data_dir, out, experiment, overrides, backbone, resume, epochs, device, workers, nproc, ssl):
    """Self-supervised pretraining of the backbone on the unlabeled scans of DATA."""
    if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_with_torchrun(nproc)
    from seg.core.pretrain import pretrain
    from seg.core.runs import claim_run_dir

    exp = None if resume else _experiment(experiment, overrides, backbone=backbone, **{"pretrain.ssl": ssl})
    with claim_run_dir(out, resume, "pretrain"):
        pretrain(data_dir, out, exp, resume=resume, device=device, workers=workers, epochs=epochs)
    console.print(f"[green]pretraining run written to {out}")


@run.command("finetune")
@_stage_options
@click.option("--init", type=click.Path(path_type=Path), default=None, help="pretraining run (folder or .pt)")
def run_finetune(data_dir, out, experiment, overrides, backbone, resume, epochs, device, workers, nproc, init):
    """Supervised fine-tuning on the labeled cases of DATA (optionally from a pretraining run)."""
    if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_with_torchrun(nproc)
    from seg.core.finetune import finetune
    from seg.core.runs import claim_run_dir

    exp = None if resume else _experiment(experiment, overrides, backbone=backbone)
    with claim_run_dir(out, resume, "finetune"):
        finetune(data_dir, out, exp, init=init, resume=resume, device=device, workers=workers, epochs=epochs)
    console.print(f"[green]fine-tuning run written to {out}")


@cli.command()
@click.option("-i", "--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="image file, DICOM series folder, or folder of images")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="label map file or folder")
@click.option("--model", "run_dir", required=True, type=click.Path(path_type=Path),
              help="fine-tuning run folder, or a model file from seg export")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
              help="default: the experiment's (fp16 on CUDA, fp32 on CPU)")
@click.option("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1)")
@click.option("--overwrite", is_flag=True, help="redo cases whose output exists")
@click.option("--save-probabilities", is_flag=True, help="also write CASE.npz class probabilities")
@click.option("--preview", is_flag=True, help="also write CASE.png: three slices with labels overlaid")
@click.option("--statistics", is_flag=True,
              help="also write CASE.json: each organ's volume (ml) and mean/min/max intensity (HU); a folder "
                   "gets statistics.csv")
def predict(input_path, output, run_dir, device, precision, overlap, overwrite, save_probabilities, preview,
            statistics):
    """Segment CT images; each label map lands on exactly its input's grid."""
    from seg.core.predict import describe_summary, predict_paths

    if overlap is not None and not 0 <= overlap < 1:
        raise SegError(f"--overlap {overlap}: must be in [0, 1)")
    summary = predict_paths(input_path, output, run_dir, overwrite=overwrite, save_probabilities=save_probabilities,
                            preview=preview, statistics=statistics, device=device, precision=precision,
                            overlap=overlap)
    if not summary["failed"]:
        console.print(describe_summary(summary), soft_wrap=True)
    if summary["failed"]:
        from seg.core.errors import CheckFailed

        raise CheckFailed(f"{len(summary['failed'])} case(s) failed, the others were written "
                          f"({describe_summary(summary)}): " + "; ".join(summary["failed"]))


@cli.command("export")
@click.argument("run_dir", metavar="RUN", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="model file to write (MODEL.seg)")
@click.option("--format", "fmt", type=click.Choice(["seg", "onnx"]), default="seg", show_default=True,
              help="onnx: also MODEL.onnx and MODEL.onnx.json (preprocessing and inferer settings)")
def export(run_dir, output, fmt):
    """Export a fine-tuning run as one model file that `seg predict --model` runs without the run or its data."""
    import shlex

    from seg.core.export import export_model

    written = export_model(run_dir, output, onnx=fmt == "onnx", command=shlex.join(["seg", *sys.argv[1:]]))
    console.print(f"[green]wrote {escape(', '.join(map(str, written)))}", highlight=False)


@cli.command()
@click.option("--pred", required=True, type=click.Path(path_type=Path), help="folder of predicted label maps")
@click.option("--gt", required=True, type=click.Path(path_type=Path), help="folder of ground-truth label maps")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="CSV of per-case scores (a .json beside it too)")
@click.option("--tolerance", type=float, default=None, help="NSD tolerance in mm for every label (default FLARE22's)")
@click.option("--per-case", is_flag=True, help="also print the per-case table")
@click.option("--rule", type=click.Choice(["2022", "2024"]), default="2022", show_default=True,
              help="2022: FLARE22's evaluation as the challenge ran it; 2024: its later code, NSD 0 where DSC < 0.2")
def evaluate(pred, gt, out, tolerance, per_case, rule):
    """Dice and normalized surface Dice per case and organ (FLARE22 rules)."""
    from seg.core.console import progress_bar
    from seg.core.evaluate import evaluate_folders
    from seg.core.io import check_output_file

    if out:  # refuse an unwritable --out before the (long) evaluation, not after it
        check_output_file(out, "--out")
        check_output_file(Path(out).with_suffix(".json"), "--out")
    with progress_bar("evaluating", None) as advance:
        report = evaluate_folders(pred, gt, tolerances=tolerance, progress=advance, rule=rule)
    if out:  # before the table: a failed write (a full disk) is then the only thing printed
        report.write(out)  # the CSV and the JSON, both or neither
    wide = console if console.is_terminal else Console(stderr=True, width=max(console.width, 140))
    wide.print(report.table())
    if per_case:
        wide.print(report.table(per_case=True))
    if report.missing:
        console.print(f"[yellow]no prediction for {len(report.missing)} case(s), scored 0: {', '.join(report.missing)}")
    if report.unmatched:
        console.print(f"[yellow]predictions without ground truth, not scored: {', '.join(report.unmatched)}")
    if out:
        console.print(f"wrote {out} and {Path(out).with_suffix('.json')}")


@cli.command()
@click.option("--experiments", "names", default="flare22-pcrl-vnet,flare22-contrastive-vnet,flare22-scratch-vnet",
              show_default=True, help="comma-separated experiment names")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="training dataset")
@click.option("--test", "test_dir", type=click.Path(path_type=Path), default=None,
              help="labeled test dataset (imagesTr/labelsTr); default DATA/imagesTs + DATA/labelsTs")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="study folder (report.md goes here)")
@click.option("--seeds", default="0", show_default=True, help="comma-separated seeds")
@click.option("--labels", default=None, help="comma-separated label budgets (numbers of labeled cases): nested "
              "subsets per seed, shared pretraining, paired comparisons")
@click.option("--pretrain-seeds", default=None, help="with --labels: seeds of the shared pretraining runs "
              "[default: the first of --seeds]")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="training runs at a time, each in its own process with its share of the CPU cores (on one GPU, "
              "they share it); a fine-tuning run starts once its pretraining has finished")
@click.option("--val-cases", default=0, show_default=True, type=click.IntRange(min=0),
              help="with --labels: labeled cases per seed kept out of every budget to validate on (model "
              "selection, convergence); 0: each run validates within its budget")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help=SET_HELP + " (every experiment; pretrain.* only those that pretrain)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", default=1, show_default=True, help="preprocessing worker processes")
def study(names, data_dir, test_dir, out, seeds, labels, pretrain_seeds, jobs, val_cases, overrides, device, workers):
    """Pretrain, fine-tune and evaluate several experiments on the same split; write OUT/report.md."""
    from seg.core.study import resolve_experiments, run_study

    def integers(option, text):
        try:
            values = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise SegError(f"{option} {text!r}: expected comma-separated integers") from None
        if not values or min(values) < 0:
            raise SegError(f"{option} {text!r}: expected comma-separated integers >= 0")
        return values

    seed_list = integers("--seeds", seeds)
    budgets = integers("--labels", labels) if labels is not None else None
    if pretrain_seeds is not None and budgets is None:
        raise SegError("--pretrain-seeds: only with --labels (without it every seed pretrains its own run)")
    pretrain_list = integers("--pretrain-seeds", pretrain_seeds) if pretrain_seeds is not None else None
    if val_cases and budgets is None:
        raise SegError("--val-cases: only with --labels (without it a run validates on a share of all its cases)")
    experiments_ = [n.strip() for n in names.split(",") if n.strip()]
    resolve_experiments(experiments_, overrides)  # fail early on a bad name or override
    report = run_study(experiments_, data_dir, out, seeds=seed_list, test=test_dir, overrides=overrides,
                       device=device, workers=workers, labels=budgets, pretrain_seeds=pretrain_list,
                       val_cases=val_cases, jobs=jobs)
    console.print(f"[green]report written to {report}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins(as_json):
    """List every plugin: name, family, and the package that provides it."""
    from seg.core import plugins as registry

    entries = [e.as_dict() for e in registry.all_entries()]
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    table = Table("family", "name", "package", "description", title="seg plugins")
    for e in entries:
        table.add_row(e["family"], e["name"], f"{e['package']} {e['version']}", e["doc"])
    console.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (resolved experiments)")
def experiments(as_json):
    """List the experiments of seg/registry.toml."""
    from seg.core.config import load_experiment, raw_experiments, to_dict

    names = sorted(raw_experiments())
    exps = [load_experiment(n) for n in names]
    if as_json:
        click.echo(json.dumps([to_dict(e) for e in exps], indent=2))
        return
    table = Table("name", "pretrain", "backbone", "loss", "description", title="seg experiments")
    for e in exps:
        table.add_row(e.name, e.pretrain.ssl.name if e.pretrain else "-", e.backbone.name, e.finetune.loss.name,
                      e.description)
    console.print(table)


def main(argv=None) -> None:
    """Entry point: user errors are one red line and exit code 2 (1 for failed checks); --debug shows tracebacks."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="seg", standalone_mode=False)
    except click.exceptions.Abort:
        console.print(INTERRUPTED, highlight=False, soft_wrap=True)
        raise SystemExit(130) from None
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # `seg run` alone: the help, as before
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.UsageError as exc:  # one line, like every other error: "error: seg CMD: what is wrong"
        where = exc.ctx.command_path if exc.ctx else "seg"
        console.print(f"[red]error: {escape(where)}: {escape(exc.format_message())} (see {escape(where)} --help)",
                      highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except SegError as exc:
        if debug:
            raise
        console.print(f"[red]error: {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print(INTERRUPTED, highlight=False, soft_wrap=True)
        raise SystemExit(130) from None
    except ImportError as exc:
        line = missing_package_line(exc)
        if debug or line is None:  # seg's own import failing is a bug: its traceback helps
            raise
        console.print(f"[red]{escape(line)}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


INTERRUPTED = ("[red]interrupted: everything written so far is whole; the same command continues where it stopped "
               "(seg run: add --resume)")
