"""The screen that chose the recommended drop-in's knot rule (docs/dropin.md, "Ahead of the peers").

    python bench/study_dropin_knot_rules.py 3 /tmp/r3.json; python bench/study_dropin_knot_rules.py 4 /tmp/r4.json
    python bench/study_dropin_knot_rules.py --merge /tmp/r3.json /tmp/r4.json   # -> bench/results/study_dropin_knot_rules.{md,json}

On draws that the comparison with the peers does not use (seeds 3 and 4, 1000 samples, the
shipped VP model), ``ConjugateMultistepScheduler(predict="x0", interp="logsnr", final_step="x0",
corrector=True)`` on custom timesteps ending at ``last`` (99, 74 or 49), by two rules: ``full``,
``np.linspace(999, last, n)`` (the first knot at 999), and ``drop``, ``np.linspace(999, last,
n + 1)[1:]`` (the pure-noise end left out, as 'leading' does; the rule ``last_timestep`` took).
FD to the 1797 digits at 5, 10 and 20 steps.
"""
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import study_dropin as S  # noqa: E402

OPT = dict(predict="x0", interp="logsnr", final_step="x0", corrector=True)


def screen(seeds, out):
    from fastint.data import load_digits
    from fastint.diffusers import ConjugateMultistepScheduler
    from fastint.metrics import frechet_distance

    torch.set_num_threads(1)
    real = load_digits("all")[0]
    _, cfg, tmap, model = S.learned_vp("vp")
    res = {}
    for seed in seeds:
        init = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        for n in [5, 10, 20]:
            for rule in ["drop", "full"]:
                for last in [99, 74, 49]:
                    if rule == "full" and last != 99 and n != 10:
                        continue
                    ts = np.linspace(999, last, n + 1)[1:] if rule == "drop" else np.linspace(999, last, n)
                    ts = ts.round().astype(int).tolist()
                    with torch.no_grad():
                        x = S.diffusers_loop(ConjugateMultistepScheduler.from_config(cfg, **OPT), model, init, ts,
                                             tmap).x
                    fd = frechet_distance(x.float(), real)
                    res[f"{seed} {n} {rule} {last}"] = fd
                    print(seed, n, rule, last, ts[0], round(fd, 4), flush=True)
    json.dump(res, open(out, "w"), indent=1)


def merge(paths):
    res = {}
    for p in paths:
        res.update(json.load(open(p)))
    seeds = sorted({k.split()[0] for k in res})
    rows = sorted({(k.split()[2], int(k.split()[3])) for k in res}, key=lambda r: (r[0], -r[1]))
    lines = ["# The drop-in's knot rule: first knot at 999 ('full') or the pure-noise end left out ('drop')", "",
             "`python bench/study_dropin_knot_rules.py` (docstring), seeds " + ", ".join(seeds) + ", 1000 samples, "
             "1 thread. FD per seed.", "", "| rule, last timestep | 5 steps | 10 steps | 20 steps |", "|---|---:|---:|---:|"]
    for rule, last in rows:
        cells = [" / ".join(f"{res[f'{s} {n} {rule} {last}']:.3f}" if f"{s} {n} {rule} {last}" in res else "—"
                            for s in seeds) for n in (5, 10, 20)]
        lines.append(f"| {rule}, {last} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    print(md)
    S.write_results("study_dropin_knot_rules", md, res)


if __name__ == "__main__":
    if sys.argv[1] == "--merge":
        merge(sys.argv[2:])
    else:
        screen([int(a) for a in sys.argv[1].split(",")], sys.argv[2])
