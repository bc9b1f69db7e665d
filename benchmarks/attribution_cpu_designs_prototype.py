"""Prototype (not library code): two further noise designs on the attribution bench.

'IS*+joint QMC': one scrambled Sobol point set in 1 + d dims per term, coordinate 0 as the
timestep uniform and the rest as the noise. 'IS*+strat+mirrored QMC': K/2 Sobol points and their
reflections. Patches the guide's timestep uniforms and SobolNoise for those rows only, measures
Var at K = 4 and 64 against the bench's reference. Usage: python THIS OUT.json [--full] [--repeats N]
Results: benchmarks/attribution_cpu_designs_quick.json.
"""
import json, math, statistics, sys, time
import torch
from carv_pyro.infer import guide as guide_mod, samplers
from carv_pyro.infer.samplers import SobolNoise, scrambled_sobol_ints, sobol_directions
from carv_pyro.pipelines.attribution.bench import AttributionBench

quick = "--full" not in sys.argv
repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 20
Ks = (4, 64)
JOINT = {"on": False, "stash": None}
orig_strat = guide_mod._stratified_uniforms
orig_sample = SobolNoise.sample

def joint_uniforms(layout, stratify, source, device):
    if not JOINT["on"]:
        return orig_strat(layout, stratify, source, device)
    d = JOINT["d"] + 1
    n_outer, n_inner = layout.n_outer, layout.n_inner
    base = source.uniform((d, 31), device)
    words = torch.floor(base * 2.0**30).to(torch.int64) % (1 << 30)
    x = scrambled_sobol_ints(n_outer * n_inner, sobol_directions(d, torch.device(device)), words)
    u = (x.to(torch.float64) + 0.5) * 2.0**-30
    JOINT["stash"] = u[:, 1:]
    return layout.ungroup(u[:, 0].reshape(n_outer, n_inner))

from carv_pyro.layout import TermLayout
def joint_sample(self, layout, event_shape, dtype, device, source):
    if JOINT.get("mirror"):
        half = TermLayout(torch.Size([layout.n_outer, layout.n_inner // 2]), (), "draws", -1, True)
        z = orig_sample(self, half, event_shape, dtype, device, source)
        return layout.ungroup(torch.cat([z, -z], dim=1), len(event_shape))
    if not JOINT["on"]:
        return orig_sample(self, layout, event_shape, dtype, device, source)
    u = JOINT["stash"]; JOINT["stash"] = None
    z = math.sqrt(2.0) * torch.erfinv(2 * u - 1)
    z = z.reshape((layout.n_outer, layout.n_inner) + tuple(event_shape)).to(dtype)
    return layout.ungroup(z, len(event_shape))

guide_mod._stratified_uniforms = joint_uniforms
SobolNoise.sample = joint_sample

bench = AttributionBench(quick=quick, seed=0)
JOINT["d"] = math.prod(bench.featurizer.objective.event_shape)
ref_n = 10 if quick else 50
t0 = time.perf_counter()
ref = bench.reference(ref_n).to(torch.float64)
print("reference", time.perf_counter() - t0, flush=True)
rows = {}
for K in Ks:
    for name, (p, s, noise, joint) in {
        "baseline": ("prior", None, "iid", False),
        "IS*+strat": ("pilot", "per_outer", "iid", False),
        "IS*+strat+QMC": ("pilot", "per_outer", "sobol", False),
        "IS*+joint QMC": ("pilot", "per_outer", "sobol", True),
        "IS*+strat+antithetic": ("pilot", "per_outer", "antithetic", False),
        "IS*+strat+mirrored QMC": ("pilot", "per_outer", "sobol", "mirror"),
    }.items():
        cfg = dict(method=name, R=bench.R, K=K, proposal=p, stratify=s, noise=noise)
        JOINT["on"] = joint is True
        JOINT["mirror"] = joint == "mirror"
        bench.estimate(cfg)
        sq, ts = [], []
        for _ in range(repeats):
            t1 = time.perf_counter()
            e = bench.estimate(cfg)
            ts.append(time.perf_counter() - t1)
            sq.append(float(((e - ref) ** 2).sum()))
        JOINT["on"] = False
        JOINT["mirror"] = False
        rows[f"{name}/K={K}"] = dict(var=statistics.fmean(sq), var_se=statistics.stdev(sq) / math.sqrt(repeats), cost_s=statistics.median(ts))
        print(name, K, rows[f"{name}/K={K}"], flush=True)
for K in Ks:
    b = rows[f"baseline/K={K}"]
    for k, r in rows.items():
        if k.endswith(f"K={K}"):
            r["re"] = b["var"] / r["var"]; r["ecm"] = b["var"] * b["cost_s"] / (r["var"] * r["cost_s"])
print(json.dumps(rows, indent=1))
json.dump(dict(quick=quick, repeats=repeats, reference_n=ref_n, rows=rows), open(sys.argv[1], "w"), indent=1)
