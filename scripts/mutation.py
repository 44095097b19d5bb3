"""Mutation testing of the code a wrong result hides in, with cosmic-ray: how many small bugs the tests catch.

    pip install cosmic-ray==8.7.0
    python scripts/mutation.py [TARGET ...] [--out results/mutation] [--timeout 300]

Each target is a set of files (optionally only some of their functions) and the fast tests that
cover them (about 5-40 s a mutant on 2 cores); a survivor is then tried against the whole suite by hand
before it is called a gap or an equivalent mutant. The run happens in a copy of the committed tree (`git worktree`, imported through a folder of
links in the installed layout, as scripts/gpu_check.sh does), never in the checkout: cosmic-ray
writes each mutant into the file it mutates. For each target: `cosmic-ray init` (every mutant of
the operators below), the mutants outside the named functions skipped, a baseline run (the tests
must pass unmutated), then every mutant against the target's tests (`pytest -x`: the first failure
kills it). Written to --out: TARGET.json (counts, and each survivor with its file, line, operator
and diff) and the sqlite session, so `cr-report` can show it again.

Which mutants are kept: see KEEP_BINARY and KEEP_COMPARISON below. `--resume` continues the sessions
in --out (a run cut short) instead of starting them again.
Docs: docs/DEVELOPMENT.md#mutation-testing (the figures, and the survivors judged equivalent).
"""
import argparse
import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COSMIC_RAY = shutil.which("cosmic-ray") or str(Path(sys.executable).with_name("cosmic-ray"))  # this venv's

FAST = ["-p", "no:randomly", "-p", "no:cacheprovider", "-q", "-x"]
TARGETS = {
    "losses": {"files": ["rmix/losses.py"],
               "tests": ["tests/test_core.py", "tests/test_mixing.py", "tests/test_wiring.py", "tests/test_evaluate.py"]},
    "mixing": {"files": ["rmix/mixing.py"],
               "tests": ["tests/test_core.py", "tests/test_mixing.py", "tests/test_wiring.py"]},
    "mix_ref": {"files": ["kernels/mix_ref.py"],
                "tests": ["tests/test_kernels.py", "tests/test_mixing.py"]},
    "checkpoint": {"files": ["rmix/checkpoint.py"], "tests": ["tests/test_checkpoint.py"]},
    "engine": {"files": ["rmix/engine.py", "rmix/optim.py", "rmix/state.py"],
               "functions": ["build_optimizer", "init_momentum", "match_param_layout", "load_optimizer_state",
                             "make_policy", "set_lr", "train_step", "train_one_epoch", "evaluate",
                             "_at_the_same_image", "Checkpoints", "RunState", "capture_rng", "restore_rng", "_to_cpu"],
               "tests": ["tests/test_core.py", "tests/test_wiring.py", "tests/test_sync.py", "tests/test_evaluate.py",
                         "tests/test_run_files.py", "tests/test_resume_layout.py", "tests/test_preempt.py",
                         "tests/test_resume_steps.py", "tests/test_reliability.py", "tests/test_legacy_runs.py"]},
    "sharding": {"files": ["pipelines/split.py", "pipelines/folders.py", "pipelines/arrays.py"],
                 "functions": ["check_sharding", "train_batches", "val_batches", "shard_indices", "first_per_class",
                               "scan_image_folder"],
                 "tests": ["tests/test_pipelines.py"]},
    "shards": {"files": ["pipelines/wds.py", "pipelines/dali.py"],
               "functions": ["read_label", "split_key", "read_dali_index", "index_shard", "_image_and_label",
                             "_check_tar_end", "_split_labels", "_no_label_gaps", "scan_shards", "ShardSplit",
                             "SampleLabels", "dali_slice"],
               "tests": ["tests/test_shard_integrity.py", "tests/test_shards.py"]},
}
# The mutants kept are the bugs a person writes: + and -, * and /, // and / swapped; a boundary moved
# (< and <=, > and >=), a comparison flipped (< and >, == and !=, is and is not); a number off by one
# (NumberReplacer); a condition negated or and/or swapped; a loop that never runs; True for False.
# Left out: an operator replaced by an unrelated one (+ by **, == by <, ...), which rarely survives a
# run that imports the module, yet costs a full test run each, and decorator removal.
KEEP_BINARY = {("Add", "Sub"), ("Sub", "Add"), ("Mul", "Div"), ("Div", "Mul"), ("FloorDiv", "Div"),
               ("Div", "FloorDiv")}
KEEP_COMPARISON = {("Lt", "LtE"), ("LtE", "Lt"), ("Gt", "GtE"), ("GtE", "Gt"), ("Lt", "Gt"), ("Gt", "Lt"),
                   ("LtE", "GtE"), ("GtE", "LtE"), ("Eq", "NotEq"), ("NotEq", "Eq"), ("Is", "IsNot"),
                   ("IsNot", "Is"), ("In", "NotIn"), ("NotIn", "In")}


def kept(operator: str) -> bool:
    """Whether a cosmic-ray operator (e.g. core/ReplaceBinaryOperator_Add_Sub) is one of the kinds above."""
    name = operator.split("/")[-1]
    for prefix, keep in (("ReplaceBinaryOperator_", KEEP_BINARY), ("ReplaceComparisonOperator_", KEEP_COMPARISON)):
        if name.startswith(prefix):
            return tuple(name[len(prefix):].split("_")) in keep
    return name != "RemoveDecorator"


def function_lines(path: Path, names) -> list[tuple[int, int]]:
    """(first, last) line of each top-level function or class in `names`."""
    tree = ast.parse(path.read_text())
    return [(node.lineno, node.end_lineno) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names]


def link_farm(tree: Path) -> Path:
    """A folder holding rmix/ in the installed layout, of links into `tree` (rmix.pipelines, rmix.kernels)."""
    src = Path(tempfile.mkdtemp(prefix="rmix-mut-src-"))
    (src / "rmix").mkdir()
    for f in (tree / "rmix").iterdir():
        (src / "rmix" / f.name).symlink_to(f)
    (src / "rmix" / "pipelines").symlink_to(tree / "pipelines")
    (src / "rmix" / "kernels").symlink_to(tree / "kernels")
    return src


def scope(db_path: Path, tree: Path, target: dict):
    """Mark skipped every pending mutant of an excluded operator or outside the target's functions."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult
    ranges = {f: function_lines(tree / f, target["functions"]) for f in target["files"]} \
        if "functions" in target else None
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            for m in item.mutations:
                line = m.start_pos[0]
                rel = os.path.relpath(m.module_path, tree) if os.path.isabs(m.module_path) else str(m.module_path)
                outside = ranges is not None and not any(a <= line <= b for a, b in ranges.get(rel, []))
                if not kept(m.operator_name) or outside:
                    db.set_result(item.job_id, WorkResult(output="out of scope", worker_outcome=WorkerOutcome.SKIPPED))
                    break


def summary(db_path: Path, tree: Path) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome
    counts = {"killed": 0, "survived": 0, "incompetent": 0, "skipped": 0, "pending": 0}
    survivors = []
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                counts["skipped"] += 1
            elif result.test_outcome == TestOutcome.KILLED:
                counts["killed"] += 1
            elif result.test_outcome == TestOutcome.INCOMPETENT:
                counts["incompetent"] += 1  # the mutant broke the import or timed out: counted as caught
            else:
                counts["survived"] += 1
                m = item.mutations[0]
                survivors.append({"file": os.path.relpath(m.module_path, tree), "line": m.start_pos[0],
                                  "operator": m.operator_name, "occurrence": m.occurrence,
                                  "diff": (result.diff or "").strip()})
        counts["pending"] = sum(1 for _ in db.pending_work_items)
    tested = counts["killed"] + counts["survived"] + counts["incompetent"]
    counts["kill_rate"] = (counts["killed"] + counts["incompetent"]) / tested if tested else None
    return {**counts, "survivors": survivors}


# A warm pytest: importing torch, DALI and torchvision takes seconds, more than many mutants' tests.
# The server imports them once and forks a child per test run, which imports rmix afresh (the mutated
# file) and runs pytest in the client's directory; the client is cosmic-ray's test command.
WARM = ("torch", "torchvision", "numpy", "PIL.Image", "click", "pytest", "nvidia.dali", "nvidia.dali.fn")


def _mutated_line(originals: dict) -> tuple[str, int] | None:
    """(file, first line that differs from its original) of the one file cosmic-ray has mutated now."""
    for name, text in originals.items():
        now = Path(name).read_text()
        if now != text:
            a, b = text.splitlines(), now.splitlines()
            return name, next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)) + 1)
    return None


def _covering_tests(cov_file: str, originals: dict) -> dict:
    """{(real path, line): {pytest node ids}} from a coverage file recorded with --cov-context=test."""
    import coverage
    data = coverage.CoverageData(basename=cov_file)
    data.read()
    wanted = {os.path.realpath(n): n for n in originals}
    out = {}
    for measured in data.measured_files():
        real = os.path.realpath(measured)
        if real not in wanted:
            continue
        for line, contexts in data.contexts_by_lineno(measured).items():
            tests = {c.rsplit("|", 1)[0] for c in contexts if c}
            out.setdefault((wanted[real], line), set()).update(tests)
    return out


def serve(path: str):
    """Answer each connection with the exit code of `pytest <args>` run in a forked child.

    A request with "map": run the tests once under coverage, recording which test runs which line
    of the target files (and remember those files' text). Every later request then runs only the
    tests that run the line cosmic-ray has mutated; a line no test runs survives at once, and a line
    run at import (a default value, a constant) gets every test of the target."""
    import importlib
    for name in WARM:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert not any(m == "rmix" or m.startswith("rmix.") for m in sys.modules), "rmix must be imported per child"
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    originals, covering = {}, None
    while True:
        conn, _ = server.accept()
        with conn:
            request = json.loads(conn.makefile().readline())
            if request.get("map"):
                originals = {str(Path(request["cwd"], f)): Path(request["cwd"], f).read_text() for f in request["map"]}
                # no source given: coverage measures all but the standard library and site-packages
                request["args"] = [*request["args"], "--cov", "--cov-context=test", "--cov-report="]
                request["env"]["COVERAGE_FILE"] = os.path.join(os.path.dirname(path), "coverage")
            elif covering is not None:
                where = _mutated_line(originals)
                tests = covering.get(where, set()) if where else set()
                if where and where not in covering:  # a line no test runs: nothing can see the mutant
                    conn.sendall(b"0\n")
                    continue
                if tests:  # else run at import only: every test of the target
                    request["args"] = [*FAST, *sorted(tests)]
            pid = os.fork()
            if pid == 0:  # the child: the request's directory and environment, pytest, its exit code
                server.close()
                os.chdir(request["cwd"])
                os.environ.clear()
                os.environ.update(request["env"])
                sys.path[:0] = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                import pytest
                code = pytest.main(request["args"])
                os._exit(int(code))
            deadline = time.monotonic() + request["timeout"]
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:  # a mutant that loops: the run ends as a timeout
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    status = 124 << 8
                    break
                time.sleep(0.05)
            if request.get("map"):
                covering = _covering_tests(request["env"]["COVERAGE_FILE"], originals)
            conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())


def client(path: str, args, map_files=None) -> int:
    """cosmic-ray's test command: the warm server's pytest run of `args` here, its exit code ours.

    `map_files`: this run records the coverage map of those files (see `serve`) instead."""
    timeout = float(os.environ.get("RMIX_MUTANT_TIMEOUT", "280"))  # below cosmic-ray's own timeout
    conn = socket.socket(socket.AF_UNIX)
    for _ in range(600):  # the server may still be importing
        try:
            conn.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.1)
    request = {"cwd": os.getcwd(), "env": dict(os.environ), "args": list(args), "timeout": 10 * timeout if map_files
               else timeout, "map": map_files}
    conn.sendall((json.dumps(request) + "\n").encode())
    code = int(conn.makefile().readline())
    return code if code >= 0 else 1  # killed by a signal: the mutant crashed the tests


def run_target(name: str, target: dict, tree: Path, src: Path, out: Path, timeout: float, resume=False):
    config = out / f"{name}.toml"
    db = out / f"{name}.sqlite"
    # the target's tests that this commit has (--ref of an older one: the suite as it was then)
    tests = " ".join(t for t in target["tests"] if (tree / t.split("::")[0]).is_file())
    sock = os.path.join(tempfile.mkdtemp(prefix="rmix-mut-"), "pytest.sock")
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1",
           "RMIX_MUTANT_TIMEOUT": str(max(timeout - 10, 10)), "RMIX_SOCKET": sock}
    server = subprocess.Popen([sys.executable, __file__, "serve", sock], env=env, cwd=tree)
    config.write_text(
        "[cosmic-ray]\n"
        f"module-path = {json.dumps(target['files'])}\n"
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{sys.executable} {__file__} client {sock} {" ".join(FAST)} {tests}"\n'
        "[cosmic-ray.distributor]\nname = \"local\"\n")
    try:
        _run_session(name, target, tree, out, config, db, env, resume, tests)
    finally:
        server.kill()


def _run_session(name, target, tree, out, config, db, env, resume, tests):
    if not (resume and db.exists()):
        if db.exists():
            db.unlink()
        subprocess.run([COSMIC_RAY, "init", str(config), str(db)], cwd=tree, env=env, check=True)
        base = subprocess.run([COSMIC_RAY, "baseline", str(config)], cwd=tree, env=env)
        if base.returncode:
            raise SystemExit(f"{name}: the tests fail without a mutant; fix them first")
    scope(db, tree, target)
    cwd = os.getcwd()
    os.chdir(tree)
    try:  # which test runs which line: each mutant then runs only the tests that run its line
        code = client(env["RMIX_SOCKET"], [*FAST[:-1], *tests.split()], map_files=target["files"])
    finally:
        os.chdir(cwd)
    if code:
        raise SystemExit(f"{name}: the tests fail under coverage (exit {code})")
    subprocess.run([COSMIC_RAY, "exec", str(config), str(db)], cwd=tree, env=env, check=True)
    result = {"target": name, "files": target["files"], "functions": target.get("functions"),
              "tests": target["tests"], **summary(db, tree)}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{name}: {result['killed']} killed, {result['incompetent']} incompetent, {result['survived']} survived "
          f"(kill rate {result['kill_rate']:.1%}); {result['skipped']} out of scope", flush=True)


def main():
    if sys.argv[1:2] == ["serve"]:
        return serve(sys.argv[2])
    if sys.argv[1:2] == ["client"]:
        sys.exit(client(sys.argv[2], sys.argv[3:]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--out", default=str(ROOT / "results" / "mutation"))
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's test run (a loop: killed)")
    p.add_argument("--ref", default="HEAD", help="the commit to mutate (a worktree of it)")
    p.add_argument("--resume", action="store_true", help="continue the sessions already in --out")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(prefix="rmix-mut-tree-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.ref], check=True,
                   capture_output=True)
    src = link_farm(tree)
    try:
        for name in args.targets:
            run_target(name, TARGETS[name], tree, src, out, args.timeout, resume=args.resume)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
