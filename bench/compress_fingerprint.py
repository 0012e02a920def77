"""Adopt a ``headmap compress`` run folder made before runs wrote ``compress-fingerprint.json``, so that
``headmap compress ... --resume`` can continue it.

    python bench/compress_fingerprint.py RUN_DIR -- <the original compress arguments>

The arguments are those of the command that made RUN_DIR (``MODEL --press ... --task ... --out RUN_DIR``;
a leading ``compress`` or ``headmap compress`` is skipped; ``--out`` may be left out and is then RUN_DIR).
The script checks that RUN_DIR holds a compress.parquet whose presses and ratios are those the arguments
name (plus the full cache) and whose tasks are among theirs, then writes the fingerprint that run would
have written (:func:`headmap.cli.compress.run_fingerprint`; no model is loaded). It refuses a folder
that already has a fingerprint. Adopting is deliberate: --resume never does it by itself. See
docs/compress.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

import headmap.cli  # noqa: F401  (registers the commands)
from headmap.cli import compress as cc
from headmap.cli.app import _CLICK_EXCEPTION, app
from headmap.errors import HeadmapError, OptionError, OutputError

USAGE = "usage: python bench/compress_fingerprint.py RUN_DIR -- MODEL --press ... [the original compress arguments]"


def parse(args: list[str]) -> dict:
    """The compress command's parameters, parsed by the command itself (its defaults filled in)."""
    group = typer.main.get_command(app)
    root = group.make_context("headmap", ["compress", "--help"], resilient_parsing=True)
    command = group.get_command(root, "compress")
    try:
        ctx = command.make_context("compress", list(args), parent=root)
    except _CLICK_EXCEPTION as exc:
        raise OptionError(f"the compress arguments do not parse: {exc.format_message()}") from None
    return dict(ctx.params)


def adopt(run: Path, args: list[str]) -> Path:
    while args and args[0] in ("headmap", "compress"):
        args = args[1:]
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args = [*args, "--out", str(run)]
    p = parse(args)
    if Path(p["out"]).resolve() != run.resolve():
        raise OptionError(f"the arguments name --out {p['out']}, not {run}; give the arguments of the run in {run}")
    table = run / cc.ROWS_FILE
    if not table.is_file():
        raise OutputError(f"{run} holds no {cc.ROWS_FILE}: nothing to adopt; run headmap compress there instead")
    if (run / cc.FINGERPRINT_FILE).exists():
        raise OutputError(f"{run} already has {cc.FINGERPRINT_FILE}; continue it with headmap compress ... --resume")
    tasks = list(p["task"] or ["needle"])
    ratios = cc.parse_ratios(p["ratio"])
    steps = cc.parse_steps(p["max_new_tokens"])
    from headmap.scan.check import shard

    part = shard(p["shard"])
    presses = cc.plan_presses(list(p["press"]), ratios, p["atlas"])
    fp = cc.run_fingerprint(p["model"], presses, ratios, tasks, p["limit"], steps, p["prefill"], p["atlas"],
                            p["dtype"], part)  # fmt: skip
    rows = cc.read_rows(table)
    have = {(str(r["press"]), float(r["ratio"])) for r in rows}
    want = {(name, float(ratio)) for name, ratio, _ in cc.with_full(presses)}
    if have != want:
        extra = sorted(have - want)
        missing = sorted(want - have)
        raise OptionError(
            f"{table} holds other presses or ratios than the arguments: only in the table {extra or 'none'}, "
            f"only in the arguments {missing or 'none'}; give the arguments of the run that made it"
        )
    other = sorted({str(r["task"]) for r in rows} - set(tasks))
    if other:
        raise OptionError(f"{table} holds items of tasks the arguments do not name: {', '.join(other)}")
    return cc.write_fingerprint(run, fp)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        print(USAGE, file=sys.stderr)
        return 2
    run = Path(argv[0])
    try:
        path = adopt(run, argv[2:])
    except HeadmapError as exc:
        print(f"compress_fingerprint: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}; continue the run with the same headmap compress command and --resume")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
