"""Run some rows of a ``carv-pyro bench`` pipeline, by the bench's own protocol.

``carv-pyro bench`` measures every row of a pipeline; on a 2-core CPU that takes minutes per
pipeline. This script runs the same protocol (`carv_pyro.bench.run_protocol`: the same
reference, repeats and round-robin timing) on the rows whose method is named, so the outer-plate
and control-variate rows can be measured next to the baseline and the rows they are compared
with, within a few minutes:

    python scripts/bench_rows.py text-to-3d --quick --methods baseline reuse "IS+strat" \\
        "outer strat" "IS+strat+outer strat" --json benchmarks/outer_cv_text_to_3d_quick.json

It prints the table, the plain components and the outer-design splits
(`carv_pyro.bench.design_splits`); the accountant's table is not run (``--quick`` benches then
take about as long as their rows).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict

from carv_pyro.bench import (
    PIPELINES,
    _jsonable,
    components_from_rows,
    design_splits,
    format_table,
    run_protocol,
)
from carv_pyro.timing import device_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", choices=sorted(PIPELINES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--reference", type=int, default=10, help="estimates in the reference")
    parser.add_argument("--methods", nargs="+", required=True, help="the rows' method names")
    parser.add_argument("--K", type=int, nargs="*", help="keep only rows at these K")
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        help="distillation only: DMD steps before the checkpoint (default: 10 quick, 100 full)",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    kwargs = {}
    if args.pretrain_steps is not None:
        if args.pipeline != "distillation":
            parser.error(f"--pretrain-steps applies to distillation, not {args.pipeline!r}")
        kwargs["pretrain_steps"] = args.pretrain_steps
    t0 = time.perf_counter()
    bench = PIPELINES[args.pipeline](quick=args.quick, seed=args.seed, device=args.device, **kwargs)
    every = bench.configs()
    keep = [c for c in every if c["method"] in args.methods and (not args.K or c["K"] in args.K)]
    unknown = set(args.methods) - {c["method"] for c in every}
    if unknown:
        raise SystemExit(
            f"no rows named {sorted(unknown)}; the rows: {[c['method'] for c in every]}"
        )
    bench.configs = lambda: keep
    rows, _ = run_protocol(bench, args.repeats, args.reference)
    print(format_table(rows))
    plain = components_from_rows(rows)
    if plain is not None:
        print(
            f"\nplain rows (R = {plain['R']}, K = 1 and {plain['K']}): V_b = "
            f"{plain['v_between']:.4g}, V_w = {plain['v_within']:.4g}, inner-plate ceiling "
            f"{plain['ceiling']:.3g}x"
        )
    splits = design_splits(rows)
    for d in splits:
        print(d.text())
    result = {
        "pipeline": args.pipeline,
        "device": device_name(args.device),
        "quick": args.quick,
        "repeats": args.repeats,
        "reference": args.reference,
        "seed": args.seed,
        "pretrain_steps": getattr(bench, "pretrain_steps", None),
        "date": time.strftime("%Y-%m-%d"),
        "methods": args.methods,
        "rows": [asdict(r) for r in rows],
        "components": plain,
        "designs": [
            dict(asdict(d), ceiling_before=d.ceiling_before, ceiling_after=d.ceiling_after)
            for d in splits
        ],
        "wall_s": time.perf_counter() - t0,
    }
    print(f"\n{result['wall_s']:.0f} s on {result['device']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=_jsonable)
    assert all(math.isfinite(r.var) for r in rows)


if __name__ == "__main__":
    main()
