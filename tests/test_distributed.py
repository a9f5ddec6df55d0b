"""Sharded, resumable generation (fastint.distributed, `fastint sample --out-dir`), with 2 gloo ranks
under torchrun: per-sample determinism, the union of the ranks' shards, resume after a deleted shard
and after a kill, manifest refusals, and the Fréchet distance reduced across ranks."""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastint
from fastint import distributed
from fastint.cli import main
from fastint.models import GaussianMixture
from fastint.seeding import philox_key, prior_draw, sample_seed

FASTINT = str(Path(sys.executable).with_name("fastint"))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
JOB = ["sample", "--method", "sddim", "--nfe", "8", "--num-samples", "45", "--no-progress"]


def cli(args):
    return subprocess.run([FASTINT, *args], capture_output=True, text=True, env=ENV, timeout=300)


def torchrun(args, nproc=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "--no-python", FASTINT, *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- per-sample determinism -------------------------------------------------------------
@pytest.mark.parametrize("sde", [fastint.VPSDE(), fastint.PSLD()], ids=["vp", "psld"])
def test_prior_draw_depends_only_on_seed_and_index(sde):
    whole = prior_draw(sde, (2, 3), seed=5, first_index=0, count=10)
    parts = torch.cat([prior_draw(sde, (2, 3), 5, 0, 3), prior_draw(sde, (2, 3), 5, 3, 7)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, prior_draw(sde, (2, 3), 6, 0, 10))  # another seed, other draws
    assert len({sample_seed(5, i) for i in range(1000)}) == 1000


@pytest.mark.parametrize("method,options", [("sddim", {}), ("em", {})])
def test_philox_noise_does_not_depend_on_the_batch(method, options):
    """Rows 4..7 of a batch of 8 equal a batch of 4 that starts at sample 4 (the old counters gave
    each batch position its own noise, so they differed)."""
    sde = fastint.PSLD() if method == "em" else fastint.VPSDE()
    model = GaussianMixture.default(sde, dim=3)
    s = fastint.Sampler(sde, method, nfe=6, **options)
    z = prior_draw(sde, (3,), 1, 0, 8)
    key = philox_key(1)
    full = s.sample(model, z, seed=key)
    assert torch.equal(full[4:], s.sample(model, z[4:], seed=key, first_index=4))
    assert torch.equal(full[:4], s.sample(model, z[:4], seed=key))
    assert not torch.equal(full[4:], s.sample(model, z[4:], seed=key))  # index 0..3's noise on samples 4..7
    with pytest.raises(ValueError, match="first_index"):
        s.sample(model, z, seed=key, first_index=-1)


# ---- the job, one process -----------------------------------------------------------------
def test_shards_union_resume_and_batch_size(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*JOB, "--batch-size", "8", "--out-dir", str(a)]) == 0
    names = sorted(p.name for p in a.iterdir())
    assert names == ["manifest.json"] + [f"shard-{k:06d}.npz" for k in range(6)]
    index, x = distributed.load(a)
    assert np.array_equal(index, np.arange(45)) and x.shape == (45, 2, 1, 1) and np.isfinite(x).all()
    # another batch size: the same samples (the analytic model and the op are batch-invariant)
    assert main([*JOB, "--batch-size", "7", "--out-dir", str(b)]) == 0
    assert np.array_equal(distributed.load(b)[1], x)
    # --out writes the same samples as the shards
    assert main([*JOB[:-3], "--batch", "45", "--no-progress", "--out", str(tmp_path / "one.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "one.npz")["x"], x)
    # a deleted shard is restored exactly; the other files are not rewritten
    before = {p.name: (p.stat().st_mtime_ns, digest(p)) for p in a.iterdir()}
    (a / "shard-000003.npz").unlink()
    time.sleep(0.01)
    assert main([*JOB, "--batch-size", "8", "--out-dir", str(a)]) == 0
    after = {p.name: (p.stat().st_mtime_ns, digest(p)) for p in a.iterdir()}
    assert after.keys() == before.keys()
    assert after["shard-000003.npz"][1] == before["shard-000003.npz"][1]
    assert all(after[n] == before[n] for n in before if n != "shard-000003.npz")


def test_other_arguments_are_refused(tmp_path, capsys):
    d = tmp_path / "d"
    assert main([*JOB, "--batch-size", "8", "--out-dir", str(d)]) == 0
    for change in (["--nfe", "9"], ["--seed", "1"], ["--batch-size", "9"], ["--option", "eta=0.5"]):
        args = [*JOB, "--batch-size", "8", "--out-dir", str(d)]
        for flag, value in zip(change[::2], change[1::2]):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        assert "holds a job with other arguments" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--num-samples", "4"], "--num-samples needs --out-dir"),
    (["--fd"], "--fd needs --out-dir"),
    (["--out-dir", "D"], "--out-dir needs --num-samples"),
    (["--out-dir", "D", "--num-samples", "4", "--batch", "2"], "not --out/--batch"),
    (["--out-dir", "D", "--num-samples", "4", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--out-dir", "D", "--num-samples", "4", "--fd"], "--fd compares with the real 8x8 digits"),
])
def test_cli_refusals(tmp_path, capsys, args, message):
    args = [str(tmp_path / "D") if a == "D" else a for a in args]
    with pytest.raises(SystemExit) as e:
        main(["sample", "--no-progress", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_python_api_refuses_batch_dependent_noise(tmp_path):
    sde = fastint.VPSDE()
    s = fastint.Sampler(sde, "sddim", nfe=4, noise="torch")
    with pytest.raises(ValueError, match="noise='philox'"):
        distributed.generate(GaussianMixture.default(sde, dim=2), sde, s, 4, 2, 0, tmp_path, (2,))


KILLED = textwrap.dedent("""
    import sys, time, torch, fastint
    from fastint import distributed
    from fastint.models import GaussianMixture
    sde = fastint.VPSDE()
    mix = GaussianMixture.default(sde, dim=2)
    def slow(z, t):
        time.sleep(float(sys.argv[2]))
        return mix(z, t)
    distributed.generate(slow, sde, fastint.Sampler(sde, "sddim", nfe=4), 40, 4, 7, sys.argv[1], (2,),
                         progress=False)
""")


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    out = tmp_path / "k"
    script = tmp_path / "job.py"
    script.write_text(KILLED)
    proc = subprocess.Popen([sys.executable, str(script), str(out), "0.05"], env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.npz"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("shard-*.npz"))
    assert 3 <= len(done) < 10, "the run should have been killed part-way"
    for p in done:  # every file that exists is a complete shard
        with np.load(p) as d:
            assert len(d["index"]) == 4
    assert subprocess.run([sys.executable, str(script), str(out), "0"], env=ENV, timeout=300).returncode == 0
    index, x = distributed.load(out)
    assert np.array_equal(index, np.arange(40))  # no index lost or duplicated
    ref = tmp_path / "ref"
    assert subprocess.run([sys.executable, str(script), str(ref), "0"], env=ENV, timeout=300).returncode == 0
    assert np.array_equal(x, distributed.load(ref)[1])
    assert not list(out.glob(".*.tmp"))


# ---- two ranks under torchrun (gloo) ----------------------------------------------------------
def test_two_ranks_equal_one_process_bit_for_bit(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r = cli([*JOB, "--batch-size", "4", "--out-dir", str(one)])
    assert r.returncode == 0, r.stderr
    r = torchrun([*JOB, "--batch-size", "4", "--out-dir", str(two)])
    assert r.returncode == 0, r.stderr
    assert "2 process(es)" in r.stdout and r.stdout.count("samples written") == 1  # rank 0 speaks
    i1, x1 = distributed.load(one)
    i2, x2 = distributed.load(two)
    assert np.array_equal(i1, i2) and np.array_equal(x1, x2)
    # resume under 2 ranks after two shards are deleted: restored exactly
    for k in (2, 9):
        (two / f"shard-{k:06d}.npz").unlink()
    r = torchrun([*JOB, "--batch-size", "4", "--out-dir", str(two)])
    assert r.returncode == 0, r.stderr
    assert "10 of 12 shards were already done" in r.stdout
    assert np.array_equal(distributed.load(two)[1], x1)


def test_fd_reduced_across_ranks_equals_single_process(tmp_path):
    from fastint.data import load_digits
    from fastint.metrics import frechet_distance

    d = tmp_path / "fd"
    job = ["sample", "--checkpoint", "vp", "--method", "ddim", "--nfe", "4", "--num-samples", "24",
           "--batch-size", "5", "--out-dir", str(d), "--fd", "--no-progress"]
    r = torchrun(job)
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("Fréchet distance")]
    assert len(line) == 1
    reduced = float(line[0].rsplit(" ", 1)[1])
    reference = load_digits("all")[0]
    single = distributed.frechet_distance(d, reference)  # no process group: every shard here
    _, x = distributed.load(d)
    direct = frechet_distance(torch.from_numpy(x), reference)  # the plain formula, no sums
    assert reduced == pytest.approx(single, abs=1e-4)  # printed with 4 decimals
    assert single == pytest.approx(direct, rel=1e-8)
