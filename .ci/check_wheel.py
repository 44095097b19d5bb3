"""What a wheel installs, checked: `names WHEEL` (its top-level entries are rmix and its dist-info,
nothing else), `sdist SDIST` (it holds every file the README links to) and `intact` (every file of
the installed rmix matches its RECORD: another package installed beside it overwrote none of them)."""
import base64
import hashlib
import sys
import zipfile
from importlib import metadata


def names(wheel):
    top = sorted({n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()})
    others = [t for t in top if t != "rmix" and not (t.startswith("rmix-") and t.endswith(".dist-info"))]
    if others or "rmix" not in top:
        sys.exit(f"{wheel}: top-level names {top}; only rmix and its dist-info may be there")
    print(f"wheel top level: {', '.join(top)}")


def sdist(path):
    """The sdist holds what the README links to: docs/ (its picture among them) and BENCHMARKS.md."""
    import re
    import tarfile
    with tarfile.open(path) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        readme = tar.extractfile(next(n for n in tar.getnames() if n.endswith("/README.md"))).read().decode()
    linked = {m.split("#")[0] for m in re.findall(r"\]\(([^)#:]+(?:#[^)]*)?)\)", readme)}
    missing = sorted(p for p in linked if p not in names)
    if missing:
        sys.exit(f"{path}: the README links to {', '.join(missing)}, which the sdist does not hold")
    print(f"sdist holds the README's {len(linked)} linked files")


def intact():
    dist = metadata.distribution("rmix")
    checked = 0
    for f in dist.files:
        if f.hash is None:  # RECORD itself, and files written at install (.pyc)
            continue
        digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, f.locate().read_bytes()).digest()).rstrip(b"=")
        if digest.decode() != f.hash.value:
            sys.exit(f"{f}: changed since rmix was installed (another package wrote over it)")
        checked += 1
    print(f"rmix intact: {checked} files match its RECORD")


if __name__ == "__main__":
    {"names": lambda: names(sys.argv[2]), "sdist": lambda: sdist(sys.argv[2]), "intact": intact}[sys.argv[1]]()
