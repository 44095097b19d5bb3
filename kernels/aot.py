"""Compile a Triton launch ahead of time for a GPU that is not here, and read ptxas's verdict.

The interpreter (TRITON_INTERPRET=1) checks a kernel's arithmetic, not that it lowers. This module
takes the exact arguments a launcher would pass (`kernels.mix_triton.launch_args`, on CPU tensors),
lets Triton's own binder specialize them as a launch on the GPU would (dtypes, 16-byte alignment,
integers equal to 1), compiles the result for `sm_XX` with no GPU present, and runs Triton's bundled
ptxas on the PTX for its register and spill report.

    report = compile_launch(kernel, args, constexprs, capability=90)
    report["registers"], report["spill_bytes"]

Uses Triton's internals (its binder and `_pack_args`), as its own launcher does; checked with
Triton 3.6 and 3.8.
"""
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def compile_launch(kernel, args, constexprs, *, capability=90, warp_size=32, **options) -> dict:
    """Compile `kernel[grid](*args, **constexprs)` for sm_`capability`; returns ptxas's figures.

    `kernel` may be a JITFunction or, under TRITON_INTERPRET=1, the interpreter's wrapper: the
    Python function inside is compiled either way. `options`: Triton's launch options (num_warps,
    maxnreg, ...). Raises whatever Triton raises on a compile error.
    """
    jit = JITFunction(kernel.fn)  # a fresh JITFunction: the decorator may have made an interpreter's one
    target = GPUTarget("cuda", capability, warp_size)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, extra = binder(*args, **constexprs, **options)
    options, signature, consts, attrs = jit._pack_args(backend, {**constexprs, **options}, bound, specialization,
                                                       extra)
    compiled = triton.compile(triton.compiler.ASTSource(jit, signature, consts, attrs), target=target,
                              options=options.__dict__)
    report = ptxas_report(compiled.asm["ptx"], capability)
    report.update(capability=capability, signature={k: v for k, v in signature.items() if v != "constexpr"},
                  num_warps=compiled.metadata.num_warps, shared=compiled.metadata.shared)
    return report


def ptxas_path(capability: int) -> str:
    """Triton's bundled ptxas (the one it compiles with)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(capability).path


def ptxas_report(ptx: str, capability: int) -> dict:
    """Registers, stack frame and spill bytes of every function in `ptx`, from `ptxas -v`."""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        # the options Triton compiles with (its make_cubin), so the registers are the ones a launch gets
        r = subprocess.run([ptxas_path(capability), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", f.name,
                            "-o", "/dev/null"],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}: {r.stderr.strip()}")
    return parse_ptxas(r.stderr)


def parse_ptxas(log: str) -> dict:
    """{"registers", "stack_bytes", "spill_bytes"} (maxima over the functions) of a `ptxas -v` log."""
    frames = [tuple(int(v) for v in m.groups()) for m in PTXAS_LINE.finditer(log)]
    regs = [int(m.group(1)) for m in REGISTERS.finditer(log)]
    if not frames or not regs:
        raise ValueError(f"no register report in the ptxas log: {log.strip()[:300]!r}")
    return {"registers": max(regs), "stack_bytes": max(f[0] for f in frames),
            "spill_bytes": max(f[1] + f[2] for f in frames), "log": log.strip()}
