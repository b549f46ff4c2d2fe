"""Command-line interface: parse, validate, call. No logic of its own.

User errors (config, data, checkpoint, arguments) exit with code 2 and one line on stderr;
``neuroplex --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from neuroplex.cli.bench import bench_app
from neuroplex.cli.common import DEBUG, Terminated, one_line, sigterm_as_interrupt, user_errors
from neuroplex.config import load_config, to_yaml
from neuroplex.errors import ConfigError, NeuroplexError
from neuroplex.files import read_json

try:  # typer >= 0.17 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="neuroplex: modular neural networks — train, evaluate, inspect.",
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configurations.")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
out = Console(highlight=False)

CHECKPOINT_HELP = "best (highest validation accuracy) | last (final epoch)"
CkaOption = Annotated[
    str,
    typer.Option(
        "--cka",
        help="CKA estimator: debiased (unbiased HSIC, ~0 for unrelated data) | biased "
        "(Kornblith et al.'s plug-in HSIC, > 0 for unrelated data at finite n)",
    ),
]
SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045 (typer needs Optional here on Python 3.10)
    typer.Option("--set", help="override a config value: --set train.lr=3e-3 (repeatable)"),
]


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for errors")] = False,
) -> None:
    DEBUG.on = debug


@app.command()
@user_errors
def train(
    config: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(
            help="YAML config file or shipped config name (neuroplex config list); default: "
            "the built-in defaults"
        ),
    ] = None,
    overrides: SetOption = None,
    run_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="run directory (default: OUTPUT_DIR/NAME-TIMESTAMP)"),
    ] = None,
    resume: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="continue the run in this directory from its last checkpoint"),
    ] = None,
    stop_after_epoch: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="end this session after N epochs (resume later)"),
    ] = None,
) -> None:
    """Train a network; write config, metrics, checkpoints and summary to a run directory."""
    from neuroplex.train.loop import train as run_training
    from neuroplex.train.progress import default_progress

    if resume is not None:
        cfg = resume_config(resume, config, overrides)
        target = resume
    else:
        cfg = load_config(config, overrides)
        target = run_dir or default_run_dir(cfg.output_dir, cfg.name)
    check_run_dir(target)
    try:
        with sigterm_as_interrupt():
            summary = run_training(
                cfg,
                target,
                resume=resume is not None,
                stop_after_epoch=stop_after_epoch,
                progress=default_progress(),
            )
    except KeyboardInterrupt as e:
        raise interrupted(e, target) from None
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    print(f"run dir: {target}")
    print(f"summary: {target / 'summary.json'}")
    print(
        f"status: {summary['status']}  test acc (final epoch): {_fmt(summary['test_acc'])}  "
        f"test acc (best val checkpoint, epoch {summary['best_epoch']}): "
        f"{_fmt(summary['test_acc_at_best_val'])}"
    )


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that cannot be one before anything is built."""
    if str(run_dir) in ("", "."):
        raise ConfigError(f"--run-dir {str(run_dir)!r}: expected a directory path (not '.')")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: a file, not a directory")


def interrupted(e: KeyboardInterrupt, run_dir: Path) -> typer.Exit:
    """One line on stderr; exit 130 (SIGINT) or 143 (SIGTERM), as a shell reports them."""
    from neuroplex.train.rundir import resume_hint

    name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
    started = (run_dir / "config.yaml").is_file()
    hint = resume_hint(run_dir) if started else "before the run started; nothing to resume"
    print(f"interrupted ({name}): {hint}", file=sys.stderr)
    return typer.Exit(143 if isinstance(e, Terminated) else 130)


def resume_config(run_dir: Path, config: Path | None, overrides: list[str] | None):
    """The run's own config; a CONFIG or --set that would change it is refused."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(saved)
    if config is not None or overrides:
        asked = load_config(config or saved, overrides)
        if to_yaml(asked) != to_yaml(cfg):
            raise ConfigError(
                f"--resume {run_dir}: the given config differs from the run's config.yaml; "
                "a resumed run keeps its config (start a new run to change it)"
            )
    return cfg


def default_run_dir(output_dir: Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = output_dir / f"{name}-{stamp}"
    n = 1
    while candidate.exists():
        n += 1
        candidate = output_dir / f"{name}-{stamp}-{n}"
    return candidate


@app.command("eval")
@user_errors
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    split: Annotated[str, typer.Option(help="test | val | train")] = "test",
    checkpoint: Annotated[str, typer.Option(help=CHECKPOINT_HELP)] = "best",
    exits: Annotated[
        bool,
        typer.Option(
            "--exits",
            help="early exit (local runs): confidence threshold, JEI-DNN gates and "
            "correctness predictor, accuracy vs stages executed; writes exits.json and exits.png",
        ),
    ] = False,
    overrides: SetOption = None,
) -> None:
    """Evaluate a run's checkpoint on a data split; print JSON (or the early-exit table)."""
    from neuroplex.train.runs import evaluate_exits, evaluate_run

    if not exits:
        if overrides:
            raise NeuroplexError("--set: only with --exits (train.exits.* keys)")
        print(json.dumps(evaluate_run(run_dir, split=split, which=checkpoint), indent=2))
        return
    report = evaluate_exits(run_dir, split=split, which=checkpoint, overrides=overrides)
    print_exits(report)
    print(f"wrote {run_dir / 'exits.json'} and {run_dir / 'exits.png'}")


def print_exits(report: dict) -> None:
    full = report["full"]
    title = (
        f"early exit on {report['split']} ({report['checkpoint']} checkpoint): all "
        f"{report['stages']} stages = "
        f"{100 * full['acc']:.2f}% (per stage: "
        + ", ".join(f"{100 * a:.1f}" for a in report["per_stage_acc"])
        + f"); JEI gates fit on {report['settings']['gate_split']}, classifiers on "
        f"{report['settings']['classifier_split']}; * = chosen on val"
    )
    table = Table(title=escape(title))
    for column in ("policy", "setting", "accuracy", "mean stages", "stages saved"):
        table.add_column(column)
    for policy, key in (("confidence", "threshold"), ("jei", "lambda"), ("correctness", "cost")):
        chosen = report["selected_on_val"][policy]
        for p in report[policy]:
            saved = 1 - p["mean_stages"] / report["stages"]
            mark = " *" if chosen is not None and chosen[key] == p[key] else ""
            table.add_row(
                policy,
                f"{key}={p[key]}{mark}",
                f"{100 * p['acc']:.2f}%",
                f"{p['mean_stages']:.2f}",
                f"{100 * saved:.0f}%",
            )
    out.print(table)


@config_app.command("show")
@user_errors
def config_show(
    file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(help="YAML config or shipped config name (default: the built-in defaults)"),
    ] = None,
    overrides: SetOption = None,
    model: Annotated[
        bool, typer.Option("--model", help="also show stages, shapes, params")
    ] = False,
) -> None:
    """Print the fully resolved config (every option, defaults included)."""
    cfg = load_config(file, overrides)
    print(to_yaml(cfg), end="")
    if model:
        from neuroplex.data.registry import load_dataset
        from neuroplex.network import build_network, describe_network

        data = load_dataset(cfg.data)
        net = build_network(cfg.model, data.input_shape, data.n_classes)
        shape = list(data.input_shape)
        table = Table(title=escape(f"model: input {shape} -> {data.n_classes} classes"))
        for column in ("part", "module", "output", "params"):
            table.add_column(column, justify="right" if column == "params" else "left")
        for row in describe_network(net, data.input_shape):
            table.add_row(row["name"], row["module"], escape(str(row["out"])), f"{row['params']:,}")
        table.add_row("total", "", "", f"{net.num_parameters():,}")
        out.print(table)


@config_app.command("list")
@user_errors
def config_list() -> None:
    """List the configs shipped with neuroplex; a name works wherever a CONFIG does
    (neuroplex train default, neuroplex config show mnist1d_mlp)."""
    from neuroplex.config import shipped_config_summaries

    table = Table(title="shipped configs (neuroplex train NAME)")
    for column in ("name", "description"):
        table.add_column(column)
    for name, summary in shipped_config_summaries().items():
        table.add_row(escape(name), escape(summary))
    out.print(table)


@app.command()
@user_errors
def datasets() -> None:
    """List the built-in datasets and what a user data file must contain."""
    from neuroplex.data.registry import describe_datasets

    table = Table(title="datasets (config key data.name)")
    for column in ("name", "samples", "features", "classes", "description"):
        table.add_column(column)
    for row in describe_datasets():
        cells = [str(row.get(c, "")) for c in ("name", "samples", "features", "classes")]
        table.add_row(*map(escape, cells), escape(str(row.get("description", ""))))
    out.print(table)


@app.command()
@user_errors
def analyze(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    probe: Annotated[int, typer.Option(help="test samples to probe with")] = 1000,
    checkpoint: Annotated[str, typer.Option(help=CHECKPOINT_HELP)] = "best",
    cka: CkaOption = "debiased",
) -> None:
    """Functional connectivity, communities, CKA between stages, path-norms, structure vs
    function of sparse stages, MoE routing and plasticity of a run."""
    from neuroplex.analysis.run import analyze_run

    result = analyze_run(run_dir, probe=probe, which=checkpoint, cka=cka)
    title = f"functional analysis of {run_dir} ({checkpoint} checkpoint, {result['probe']} probes)"
    table = Table(title=escape(title))
    for column in ("stage", "kind", "units", "communities", "modularity", "NMI", "dead"):
        table.add_column(column)
    for st in result["stages"]:
        nmi = f"{st['nmi']:.2f}" if "nmi" in st else "-"
        table.add_row(
            str(st["stage"]),
            st["kind"],
            str(st["units"]),
            str(st["communities"]),
            f"{st['modularity']:.3f}",
            nmi,
            f"{100 * st['dead']:.0f}%",
        )
    out.print(table)
    if result["path_norm"] is not None:
        print(f"path-norm: L1 {result['path_norm']['l1']:.4g}  L2 {result['path_norm']['l2']:.4g}")
    for row in result["sparse_layers"]:
        print(f"sparse layer {row['text']}")
    adjacent = ", ".join(f"{v:.2f}" for v in result["cka_adjacent"]) or "n/a"
    print(
        f"{result['cka_estimator']} CKA between consecutive stages: {adjacent} "
        f"(shuffled-rows baseline |CKA| <= {result['cka_shuffled_max_abs']:.2f})"
    )
    _print_structure_and_routing(result)
    print(f"wrote {run_dir / 'analysis.json'} and {run_dir / 'analysis.npz'}")


def _print_structure_and_routing(result: dict) -> None:
    for st in result["stages"]:
        if "structure" in st:
            rho = st["structure"]["from_weights"]["rho"]
            shown = (
                "n/a (fewer than 3 ensembles or uniform wiring)" if rho is None else f"{rho:.2f}"
            )
            print(f"stage {st['stage']}: structure vs function, Spearman rho {shown}")
    for r in result["routing"]:
        print(
            f"stage {r['stage']} routing: expert-class MI {r['mi_bits']:.3f} bits "
            f"({100 * r['mi_over_class_entropy']:.0f}% of H(class)), gate entropy "
            f"{r['token_entropy_bits']:.2f} of {r['max_entropy_bits']:.2f} bits"
        )


@app.command()
@user_errors
def compare(
    run_a: Annotated[Path, typer.Argument(help="first run directory")],
    run_b: Annotated[Path, typer.Argument(help="second run directory")],
    probe: Annotated[int, typer.Option(help="test samples to probe with")] = 1000,
    cka: CkaOption = "debiased",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Linear CKA between the stages of two runs (e.g. backprop vs local), best checkpoints,
    with its shuffled-rows baseline: a table (rows: run A's stages, columns: run B's)."""
    from neuroplex.analysis.run import compare_runs

    result = compare_runs(run_a, run_b, probe=probe, cka=cka)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(cka_table(result))
    shuffled = max((abs(v) for row in result["cka_shuffled"] for v in row), default=0.0)
    print(f"shuffled-rows baseline: |CKA| <= {shuffled:.2f} (what unrelated stages would score)")


def cka_table(result: dict) -> Table:
    """CKA ``[stages of A, stages of B]`` as a labelled table, two decimals."""
    title = (
        f"{result['estimator']} linear CKA, {result['checkpoint']} checkpoints, "
        f"{result['probe']} test inputs: rows A = {result['run_a']}, columns B = {result['run_b']}"
    )
    table = Table(title=escape(title))
    table.add_column("A \\ B")
    for j in range(len(result["cka"][0]) if result["cka"] else 0):
        table.add_column(f"B stage {j}", justify="right")
    for i, row in enumerate(result["cka"]):
        table.add_row(f"A stage {i}", *(f"{v:.2f}" for v in row))
    return table


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    bench: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option(help="benchmark table (.md) to include; repeatable"),
    ] = None,
    baseline: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="a run to compare with: communities vs designed ensembles side by side "
            "(e.g. the dense twin of a modular run)"
        ),
    ] = None,
    probe: Annotated[
        int, typer.Option(help="test samples for the analysis, if not yet run")
    ] = 1000,
) -> None:
    """Write RUN_DIR/report.html: one self-contained page (runs `analyze` first when a run has
    no analysis of the current format)."""
    from neuroplex.analysis.run import analyze_run, is_current
    from neuroplex.report.html import write_report

    if not (run_dir / "summary.json").is_file():
        raise NeuroplexError(f"{run_dir}: not a finished run (no summary.json)")
    if baseline is not None and not (baseline / "summary.json").is_file():
        raise NeuroplexError(f"--baseline {baseline}: not a finished run (no summary.json)")
    for path in (run_dir, baseline):
        if path is not None:
            read_json(path / "summary.json")  # one line if it was edited into something else
    for path in bench or []:
        if not path.is_file():
            raise NeuroplexError(f"--bench {path}: file not found")
    for path in (run_dir, baseline):
        if path is not None and not is_current(path):
            analyze_run(path, probe=probe)
    print(f"report: {write_report(run_dir, bench, baseline)}")


@app.command()
@user_errors
def customize(
    run_dir: Annotated[Path, typer.Argument(help="a trained run (its best checkpoint)")],
    data: Annotated[str, typer.Option(help="dataset name (e.g. mnist1d_shifted) or .npz/.csv")],
    out: Annotated[Path, typer.Option(help="output directory")],
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
) -> None:
    """Freeze the run as global expert; train a small local expert and a gate on new data."""
    from neuroplex.methods.customize import customize as run_customize

    summary = run_customize(run_dir, data, out, epochs=epochs, seed=seed)
    before, after = summary["before"], summary["after"]
    print(
        f"new data: {100 * before['new_test_acc']:.1f}% -> {100 * after['new_test_acc']:.1f}%  "
        f"original: {100 * before['original_test_acc']:.1f}% -> "
        f"{100 * after['original_test_acc']:.1f}%  cost: "
        f"{100 * summary['cost_fraction']['params']:.1f}% params, "
        f"{100 * summary['cost_fraction']['macs']:.1f}% MACs of the global expert"
    )
    print(f"summary: {out / 'summary.json'}")


@app.command()
@user_errors
def prune(
    run_dir: Annotated[Path, typer.Argument(help="a finished run that kept rewind weights")],
    rounds: Annotated[int, typer.Option(min=1, help="pruning rounds")] = 5,
    rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="fraction of the remaining weights per round")
    ] = 0.2,
    rewind_epoch: Annotated[
        int, typer.Option(min=0, help="rewind to this epoch, train from it (train.save_epochs)")
    ] = 0,
) -> None:
    """Lottery tickets: prune by magnitude, rewind, retrain; RUN_DIR/prune/round_R per round."""
    from neuroplex.plasticity.prune import prune_run
    from neuroplex.train.progress import default_progress

    rows = prune_run(run_dir, rounds, rate, rewind_epoch, progress=default_progress)
    columns = ("round", "sparsity", "weights", "test acc (final epoch)", "run dir")
    table = Table(*columns, title="lottery tickets")
    for row in rows:
        acc = "n/a" if row["test_acc"] is None else f"{100 * row['test_acc']:.1f}%"
        sparsity = f"{100 * row['sparsity']:.1f}%"
        table.add_row(str(row["round"]), sparsity, str(row["weights"]), acc, row["run_dir"])
    out.print(table)
    print(f"table: {run_dir / 'prune' / 'prune.md'}")


@app.command()
@user_errors
def sweep(
    config: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(help="YAML config file (default: the built-in defaults)"),
    ] = None,
    seeds: Annotated[str, typer.Option(help="seeds: N, A-B or a comma list (0-4, 0,2,5)")] = "0",
    grid: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="KEY=V1,V2,...: a config key and its values (repeatable: product)"),
    ] = None,
    jobs: Annotated[int, typer.Option(help="runs at once (processes; cores split)")] = 1,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="sweep directory (default: OUTPUT_DIR/sweep-CONFIG_NAME)"),
    ] = None,
) -> None:
    """Train every grid cell x seed (skipping finished runs, resuming interrupted ones); write
    sweep.json, sweep.md (mean ± std per cell, best on validation) and sweep.png."""
    from neuroplex.sweep.run import sweep as run_sweep

    if out is None:
        cfg = load_config(config)
        out = cfg.output_dir / f"sweep-{config.stem if config is not None else cfg.name}"
    check_run_dir(out)
    try:
        with sigterm_as_interrupt():
            result = run_sweep(config, seeds=seeds, grid=grid, out=out, jobs=jobs, say=_say)
    except KeyboardInterrupt as e:
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        print(f"interrupted ({name}): give the same command again to continue", file=sys.stderr)
        raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
    print((out / "sweep.md").read_text(encoding="utf-8"), end="")
    best = result["best"]
    shown = "none (no validation accuracy)" if best is None else best or "the config (no --grid)"
    print(f"best cell: {shown}")
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'} and {out / 'sweep.png'}")


@app.command()
@user_errors
def runs(
    directory: Annotated[Path, typer.Argument(help="a folder of run directories (e.g. a sweep)")],
) -> None:
    """List the runs under DIRECTORY with their status and key figures."""
    from neuroplex.sweep.summary import list_runs

    rows = list_runs(directory)
    columns = ("run", "status", "epochs", "params", "val acc", "test acc", "test acc (best val)")
    table = Table(title=escape(f"{len(rows)} runs under {directory}"))
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            escape(str(Path(row["run_dir"]).relative_to(directory))),
            row["status"],
            str(row.get("epochs", "")),
            f"{row['params']:,}" if row.get("params") is not None else "",
            *(_pct(row.get(key)) for key in ("val_acc", "test_acc", "test_acc_at_best_val")),
        )
    out.print(table)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    out: Annotated[Path, typer.Option(help="output directory")],
    checkpoint: Annotated[
        str, typer.Option(help=f"{CHECKPOINT_HELP} | an epoch number the run kept")
    ] = "best",
) -> None:
    """Write a run's model for use outside neuroplex: model.safetensors + model.json
    (architecture, preprocessing; reload with neuroplex.load_model) and, when the model allows
    it, model.pt2 (torch.export)."""
    from neuroplex.train.export import describe_export, export_model

    meta = export_model(run_dir, out, checkpoint)
    epoch = meta["source"]["epoch"]
    print(f"wrote {out / 'model.safetensors'} and {out / 'model.json'} (epoch {epoch})")
    print(describe_export(meta))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> None:
    """The console entry point: a usage error (unknown command or option, missing or invalid
    argument) is one line on stderr and exit code 2, like every other user error."""
    sys.exit(run(argv))


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: sys.argv); the exit code."""
    try:
        code = app(args=argv, prog_name="neuroplex", standalone_mode=False)
    except NoArgsIsHelpError as e:
        print(e.format_message(), file=sys.stderr)
        return 2
    except ClickException as e:
        if DEBUG.on:
            raise
        where = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) is not None else ""
        help_hint = f" (see {e.ctx.command_path} --help)" if where else ""
        print(f"error: {where}{one_line(e.format_message())}{help_hint}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
