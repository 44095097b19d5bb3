"""Runs sharing the CPU: `rmix train` alone against several copies at once, under rmix's OpenMP
wait policy and libgomp's default, in one benchmark run.

    from rmix.bench.contention import contention, format_contention
    print(format_contention(contention(epochs=5)))

Every run is a fresh `rmix train` process on the embedded set (generated before the clock
starts), as a user starts one, so a figure includes the interpreter's start and torch's import.
After one untimed warm-up run, each policy is measured alone, then as `procs` copies started together (the figure is the wall
time until the last one ends); policies and repetitions are interleaved so that all see the same
machine. The policies differ only in the environment of the child processes:
- rmix: what the `rmix` command sets by default (GOMP_SPINCOUNT=10000, cli.py);
- libgomp: libgomp's own default, a spin of 300,000 iterations before a thread sleeps
  (GOMP_SPINCOUNT=300000, the value libgomp uses when neither it nor OMP_WAIT_POLICY is set);
- passive: OMP_WAIT_POLICY=PASSIVE, no spin at all;
- spin:N: GOMP_SPINCOUNT=N, any other spin.
Ratios: together / alone per policy (N copies on N cores ideally take 1x, on fewer cores up to
about N x), and each policy's alone time over libgomp's alone time (what the policy costs a run
that has the machine to itself).
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rmix.bench.timing import machine_info, median

POLICIES = {  # environment of the child processes; OpenMP variables not named here are removed
    "rmix": {},
    "libgomp": {"GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
OPENMP_WAIT_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
RMIX = "import sys; sys.argv[0] = 'rmix'; from rmix.cli import main; main()"


def policy_env(policy: str) -> dict:
    """The OpenMP variables of a policy name (see POLICIES, or spin:N); ValueError for another name."""
    if policy in POLICIES:
        return POLICIES[policy]
    name, _, n = policy.partition(":")
    if name == "spin" and n.isdigit():
        return {"GOMP_SPINCOUNT": n}
    raise ValueError(f"--policies: {policy!r} is none of {', '.join(POLICIES)}, spin:N")


def child_env(policy: str) -> dict:
    """This process's environment with `policy`'s OpenMP wait settings and nothing else of the kind."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARS}
    env.update(policy_env(policy))
    return env


def timed_runs(n: int, policy: str, train_args: list, workdir: Path) -> float:
    """Start `n` `rmix train` processes at once; seconds until the last one has exited."""
    env = child_env(policy)
    procs, logs = [], []
    t0 = time.perf_counter()
    for _ in range(n):
        out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
        log = open(out.parent / "log.txt", "w+")  # a file, not a pipe: a full pipe would stall the run
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-c", RMIX, "train", *train_args, "--out", str(out)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    codes = [p.wait() for p in procs]
    seconds = time.perf_counter() - t0
    for code, log in zip(codes, logs):
        log.seek(0)
        lines = log.read().strip().splitlines()
        log.close()
        if code != 0:
            raise ValueError(f"rmix train ({policy}) exited {code}: {lines[-1] if lines else 'no output'}")
    return seconds


def contention(*, epochs=5, procs=2, reps=1, policies=("rmix", "libgomp"), max_steps=None, log=print) -> dict:
    """Wall seconds of `rmix train --epochs E` alone and as `procs` copies at once, per policy."""
    for name, v in (("--epochs", epochs), ("--procs", procs), ("--reps", reps)):
        if v < 1:
            raise ValueError(f"{name}: must be positive, got {v}")
    if not policies:
        raise ValueError(f"--policies: expected some of {', '.join(POLICIES)}, spin:N; got none")
    envs = {p: policy_env(p) for p in policies}
    from rmix.pipelines.synth import default_data_dir
    default_data_dir()  # generated now, not inside a timed run (nor by two runs at once)
    info = machine_info("cpu")  # the load average before any run
    args = ["--epochs", str(epochs)] + (["--max-steps", str(max_steps)] if max_steps else [])
    times = {p: {"alone_s": [], "together_s": []} for p in policies}
    with tempfile.TemporaryDirectory(prefix="rmix-contention-") as tmp:
        timed_runs(1, policies[0], ["--epochs", "1", "--max-steps", "2"], Path(tmp))  # warm: disk cache, imports
        for rep in range(reps):
            for p in policies:
                for key, n in (("alone_s", 1), ("together_s", procs)):
                    s = timed_runs(n, p, args, Path(tmp))
                    times[p][key].append(round(s, 2))
                    log(f"rep {rep + 1}/{reps} {p}: {'alone' if n == 1 else f'{n} at once'} {s:.1f} s")
    result = {"epochs": epochs, "max_steps": max_steps, "procs": procs, "reps": reps,
              "policies": {}, "env": envs, "machine": info}
    for p in policies:
        alone, together = median(times[p]["alone_s"]), median(times[p]["together_s"])
        result["policies"][p] = {**times[p], "alone_median_s": alone, "together_median_s": together,
                                 "together_over_alone": round(together / alone, 3)}
    if "libgomp" in times:
        base = result["policies"]["libgomp"]["alone_median_s"]
        for p in policies:
            result["policies"][p]["alone_over_libgomp_alone"] = round(result["policies"][p]["alone_median_s"] / base, 3)
    return result


def format_contention(d: dict) -> str:
    """A table of a `contention` result, one row per policy."""
    steps = f", --max-steps {d['max_steps']}" if d["max_steps"] else ""
    m = d["machine"]
    lines = [f"rmix train --epochs {d['epochs']}{steps}: alone, and {d['procs']} at once "
             f"(medians of {d['reps']}; {m['cpus_usable']} CPUs usable, load {m['load_avg']})",
             f"{'policy':<9} {'alone s':>8} {'together s':>11} {'together/alone':>15} {'alone/libgomp':>14}  env"]
    width = max(9, *(len(p) for p in d["policies"]))
    lines[1] = f"{'policy':<{width}}" + lines[1][9:]
    for p, r in d["policies"].items():
        rel = r.get("alone_over_libgomp_alone")
        env = " ".join(f"{k}={v}" for k, v in d["env"][p].items()) or "(rmix's default: GOMP_SPINCOUNT=10000)"
        lines.append(f"{p:<{width}} {r['alone_median_s']:>8.1f} {r['together_median_s']:>11.1f} "
                     f"{r['together_over_alone']:>14.2f}x {'' if rel is None else f'{rel:.2f}x':>14}  {env}")
    return "\n".join(lines)
