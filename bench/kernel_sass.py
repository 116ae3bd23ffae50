"""Static SASS instruction counts of the fused CUDA kernels of ``hardtovary.accel.rules``, and their roofline: no GPU.

For each kernel (mean, AND-mask, geometric mean paper / original, SAND-mask, the in-place rescaling) for gradients
of ``--dtype``, the script rebuilds the CUDA source CuPy 14.2 generates for the project's ``cupy.ElementwiseKernel``
(its arguments are taken from ``accel.rules._kernel`` itself, so the current kernels are counted), compiles it with
NVRTC and CuPy's options (``-ftz=true``, ``-arch=sm_XX``, the kernel's own ``--maxrregcount``) to a cubin,
disassembles that with nvdisasm and counts its SASS instructions:

- per environment: the environment loop unrolled by 4 (the innermost loop holding 4 global loads, LDG), divided by
  its LDG count, and how many of them are MUFU, FP32, FP64, integer and other (moves, conversions, memory,
  control, uniform datapath). A static count: exact for a loop without branches inside (the float32 kernels),
  both sides counted otherwise (marked ``*``: the float64 logarithm);
- per coordinate: the shortest path a thread can take from the kernel's entry through the environment loop to an
  EXIT (the rescaling: through its store), not counting the environment loop (the per-environment part) and
  passing every other loop once. CuPy launches one thread per coordinate (``ceil(P / 128)`` blocks of 128), so
  the grid-stride loop of ``CUPY_FOR`` runs once and the prologue and epilogue (``loop_prep``, ``after_loop``: the
  block's kept count) count per coordinate. Shortest: no slow paths (float division's), no code for the K % 4
  leftover environments, none of what only one lane of a warp or thread 0 of a block runs (the atomics), the
  cheaper side of every data-dependent branch (the geometric means: no ``exp`` for a masked coordinate, the
  common case at tau = 1); a lower estimate of what a warp issues. The longest such path (every branch towards
  more code; a slow path's call site, not the slow path) is printed too, as an upper estimate.

Registers and spills are ptxas's report (``--ptxas-options=-v`` on the same NVRTC compile that makes the cubin).

The roofline, for the GPU of the constants below, K environments and P coordinates:

- memory time: the bytes the kernel moves (reads ``K * P`` gradient elements, writes the value in the compute
  dtype and the mask: 1 byte for a bool mask, the compute dtype's size for the SAND-mask's soft mask; the
  rescaling reads and writes the value) at the measured device-to-device copy bandwidth;
- issue time: ``(per_environment * K + per_coordinate) * P`` thread instructions (the K % 4 leftover
  environments at the unrolled loop's rate), 32 per warp instruction, one warp instruction per clock per
  scheduler, 4 schedulers per SM, at the boost clock;
- the bound is the larger of the two; "of copy" is the fraction of copy bandwidth the bound allows (memory time /
  bound). Measured kernel times are read from the gpu_check log below when its K, P and dtype are those asked.

Limits: static counts, not a simulation: no instruction replays, stalls, latency, occupancy or tail effects, no
cache behaviour; one instruction issued per clock per scheduler (Hopper has no dual issue). The pipes slower than
issue are not modelled: MUFU (16 lanes per SM on sm_90: a warp instruction holds it 8 clocks), FP64 (64 lanes per
SM on H100/H200: 2 clocks), integer (64 lanes per SM, 2 clocks, but on two pipes: IMAD on the FMA pipe, the rest
on the ALU pipe) and conversions (16 lanes). So the issue time of a kernel heavy in these (FP64 in the float64
rows) is an optimistic estimate, not a bound; the instruction mix printed below the table shows them.

Usage: ``python bench/kernel_sass.py [--arch sm_90] [--dtype float32] [--K 16] [--P 50000000] [--keep-files DIR]``
(``--keep-files``: write each kernel's .cu, .cubin, .sass and NVRTC options there). Needs ``hardtovary`` importable
and, in this interpreter's site-packages or named by environment variables: NVRTC (wheel nvidia-cuda-nvrtc-cu12;
HTV_NVRTC, the library), nvdisasm (nvidia-cuda-nvdisasm; HTV_NVDISASM), the CUDA headers
(nvidia-cuda-runtime-cu12; HTV_CUDA_INCLUDE) and CuPy's headers (``cupy/_core/include`` of the cupy-cuda12x wheel;
HTV_CUPY_INCLUDE; CuPy itself need not work, only its headers are read). Exit status 2 when one is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path
from typing import NamedTuple

try:
    import numpy as np
except ImportError:  # main() says to run it in the project's environment
    np = None

# ----------------------------------------------------------------------------------------------------------------
# The GPU of the roofline: NVIDIA H200 SXM
# ----------------------------------------------------------------------------------------------------------------

GPU_NAME = "NVIDIA H200 SXM"
SMS = 132
SCHEDULERS_PER_SM = 4  # each issues one warp instruction per clock
CLOCK_HZ = 1.98e9  # boost clock
WARP = 32
#: Device-to-device copy of the K = 16, P = 5e7 float32 stack (3.2 GB), read + write: the line "device copy of the
#: stack: 1.487 ms, 4304 GB/s (read + write)" of MEASURED_LOG (bench/gpu_check.py on an H200, 2026-11-28).
COPY_BYTES_PER_S = 4304e9
MEASURED_LOG = Path(__file__).resolve().parent / "results" / "nvidia-h200-2026-11-28" / "gpu_check.txt"
MEASURED_ARCH = "sm_90"

#: The kernels counted: (label, name of its rule id in hardtovary.accel.rules). Labels begin the log's rows.
KERNELS = [
    ("mean", "_MEAN"),
    ("and_mask", "_AND"),
    ("geometric_mean paper", "_GM_PAPER"),
    ("geometric_mean original", "_GM_ORIGINAL"),
    ("sand_mask", "_SAND"),
    ("rescale", "_RESCALE"),
]

#: Print progress to stderr once compiling has taken this long.
PROGRESS_AFTER_S = 2.0

# ----------------------------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------------------------


class Tools(NamedTuple):
    nvrtc: str
    nvdisasm: str
    cuda_include: str
    cupy_include: str


#: Each tool: (what it is, the environment variable that names it, the wheel that installs it).
TOOL_SOURCES = {
    "nvrtc": ("NVRTC", "HTV_NVRTC", "nvidia-cuda-nvrtc-cu12"),
    "nvdisasm": ("nvdisasm", "HTV_NVDISASM", "nvidia-cuda-nvdisasm"),
    "cuda_include": ("the CUDA headers", "HTV_CUDA_INCLUDE", "nvidia-cuda-runtime-cu12"),
    "cupy_include": ("CuPy's headers", "HTV_CUPY_INCLUDE", "cupy-cuda12x"),
}


def site_dirs() -> list[str]:
    """The directories this interpreter's packages are installed in (site-packages, user site, sys.path)."""
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def find_in_site(*patterns: str) -> str | None:
    """The first path matching one of the glob ``patterns``, relative to a site directory."""
    for pattern in patterns:
        for d in site_dirs():
            hits = sorted(glob.glob(os.path.join(d, pattern)))
            if hits:
                return hits[0]
    return None


def cupy_include_dir() -> str | None:
    """``cupy/_core/include`` of an installed cupy package, found without importing cupy."""
    try:
        spec = importlib.util.find_spec("cupy")
    except (ImportError, ValueError):
        spec = None
    for d in (spec.submodule_search_locations or []) if spec else []:
        inc = os.path.join(d, "_core", "include")
        if os.path.isfile(os.path.join(inc, "cupy", "carray.cuh")):
            return inc
    return None


def find_tools() -> Tools | None:
    """The tools, or None after printing one line that says what to install."""
    found = {
        "nvrtc": find_in_site("nvidia/cuda_nvrtc/lib/libnvrtc.so.*", "nvidia/cu13/lib/libnvrtc.so.*"),
        "nvdisasm": find_in_site("nvidia/cu13/bin/nvdisasm", "nvidia/cuda_nvdisasm/bin/nvdisasm")
        or shutil.which("nvdisasm"),
        "cuda_include": find_in_site("nvidia/cuda_runtime/include", "nvidia/cu13/include"),
        "cupy_include": cupy_include_dir(),
    }
    for tool, (_, env, _) in TOOL_SOURCES.items():
        found[tool] = os.environ.get(env) or found[tool]
    missing = [tool for tool, path in found.items() if not path or not os.path.exists(path)]
    if missing:
        what, envs, wheels = zip(*(TOOL_SOURCES[tool] for tool in missing))
        note = " (only the headers of cupy-cuda12x are read: CuPy need not work)" if "cupy_include" in missing else ""
        print(f"kernel_sass.py: {', '.join(what)} not found: pip install {' '.join(wheels)}{note}, or set "
              f"{', '.join(envs)}", file=sys.stderr)
        return None
    return Tools(**found)


def nvdisasm_version(tools: Tools) -> str:
    out = subprocess.run([tools.nvdisasm, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "?"


class NVRTC:
    """The NVRTC library through ctypes: CUDA C++ to a cubin, in process."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for fn in ("nvrtcGetCUBINSize", "nvrtcGetProgramLogSize"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        for fn in ("nvrtcGetCUBIN", "nvrtcGetProgramLog"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        self.lib = lib

    def version(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        return f"{major.value}.{minor.value}"

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def _read(self, prog, size_fn: str, get_fn: str) -> bytes:
        n = ctypes.c_size_t()
        self._check(getattr(self.lib, size_fn)(prog, ctypes.byref(n)), size_fn)
        buf = ctypes.create_string_buffer(n.value)
        self._check(getattr(self.lib, get_fn)(prog, buf), get_fn)
        return buf.raw[:n.value]

    def cubin(self, source: str, name: str, options: list[str]) -> tuple[bytes, str]:
        """``(cubin, log)`` of ``source`` compiled with ``options`` (which name an ``-arch=sm_XX``)."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            rc = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            log = self._read(prog, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog").rstrip(b"\0")
            if rc != 0:
                raise RuntimeError(f"NVRTC failed on {name}:\n{log.decode(errors='replace')}")
            return self._read(prog, "nvrtcGetCUBINSize", "nvrtcGetCUBIN"), log.decode(errors="replace")
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ----------------------------------------------------------------------------------------------------------------
# The kernels as rules._kernel defines them
# ----------------------------------------------------------------------------------------------------------------


class KernelDefinition:
    """Stands in for ``cupy.ElementwiseKernel`` while ``rules._kernel`` runs: keeps the arguments it is given."""

    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="",
                 no_return=False, return_tuple=False, **kwargs):
        self.in_params = in_params
        self.out_params = out_params
        self.operation = operation
        self.name = name
        self.preamble = preamble
        self.loop_prep = kwargs.get("loop_prep", "")
        self.after_loop = kwargs.get("after_loop", "")
        self.options = tuple(kwargs.get("options", ()))


def kernel_definitions(rules, cdt: np.dtype) -> dict[str, KernelDefinition]:
    """label -> what ``rules._kernel(kind, cdt)`` creates its ``cupy.ElementwiseKernel`` with. A stand-in ``cupy``
    module is installed meanwhile (CuPy is not needed; an installed one is left alone), and the module's kernel
    cache is restored afterwards."""
    stand_in = types.ModuleType("cupy")
    stand_in.ElementwiseKernel = KernelDefinition
    saved_module, saved_cache = sys.modules.get("cupy"), dict(rules._KERNELS)
    sys.modules["cupy"] = stand_in
    rules._KERNELS.clear()
    try:
        return {label: rules._kernel(getattr(rules, kind), cdt) for label, kind in KERNELS}
    finally:
        rules._KERNELS.clear()
        rules._KERNELS.update(saved_cache)
        if saved_module is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved_module


# ----------------------------------------------------------------------------------------------------------------
# The CUDA source and NVRTC options of CuPy 14.2 (cupy/_core/_kernel.pyx: _get_elementwise_kernel_code;
# cupy/_core/core.pyx: compile_with_cache, assemble_cupy_compiler_options; cupy/cuda/compiler.py)
# ----------------------------------------------------------------------------------------------------------------

CUPY_HEADERS = "".join(f"#include <{h}>\n" for h in
                       ("cupy/complex.cuh", "cupy/carray.cuh", "cupy/atomics.cuh", "cupy/math_constants.h"))
#: NumPy dtype -> (C type, the header it needs), as cupy/_core/_scalar.pyx.
C_TYPES = {
    "float64": ("double", None), "float32": ("float", None), "float16": ("float16", '#include "cupy/float16.cuh"'),
    "int64": ("long long", None), "int32": ("int", None), "int16": ("short", None), "int8": ("signed char", None),
    "uint64": ("unsigned long long", None), "uint32": ("unsigned int", None), "uint16": ("unsigned short", None),
    "uint8": ("unsigned char", None), "bool": ("bool", None),
}
#: An array uses 32-bit indexing when its bytes are at most this; the indexer, when its size is (core.pyx).
INDEX_32_LIMIT = 1 << 31


class Param(NamedTuple):
    """One ElementwiseKernel parameter, ``[raw] TYPE NAME``: TYPE a type variable (one letter) or a dtype name."""

    name: str
    type: str
    raw: bool
    out: bool

    @property
    def is_array(self) -> bool:
        """Outputs are arrays; the project passes arrays for raw and type-variable inputs, scalars otherwise."""
        return self.out or self.raw or len(self.type) == 1

    @property
    def const(self) -> bool:
        return not self.out  # CuPy declares the inputs const ("_non_const" is not used here)


def parse_params(text: str, out: bool) -> list[Param]:
    params = []
    for item in text.split(","):
        *modifiers, typ, name = item.split()
        params.append(Param(name, typ, "raw" in modifiers, out))
    return params


def kernel_source(k: KernelDefinition, type_vars: dict[str, np.dtype], elements: dict[str, int], size: int) -> str:
    """The source CuPy compiles for ``k`` called on C-contiguous arrays: ``type_vars`` the dtypes of its type
    variables (T, C), ``elements`` the element counts of its raw arrays (their indexing, 32- or 64-bit, depends
    on it), ``size`` the coordinates (the elementwise arrays' and the indexer's size)."""
    decls = set()

    def c_type(typ: str) -> str:
        name, header = C_TYPES[np.dtype(type_vars.get(typ, typ)).name]
        if header:
            decls.add(header)
        return name

    params = parse_params(k.in_params, out=False) + parse_params(k.out_params, out=True)
    args, bindings = [], []
    for p in params:
        const = "const " if p.const else ""
        if p.is_array:
            nbytes = (elements[p.name] if p.raw else size) * np.dtype(type_vars.get(p.type, p.type)).itemsize
            args.append(f"{const}CArray<{c_type(p.type)}, 1, 1, {int(nbytes <= INDEX_32_LIMIT)}> "
                        f"{p.name if p.raw else '_raw_' + p.name}")
        else:
            args.append(f"{const}{c_type(p.type)} {p.name}")
        if p.is_array and not p.raw:
            ctype = p.type if len(p.type) == 1 else c_type(p.type)
            bindings.append(f"{const}{ctype} &{p.name} = _raw_{p.name}[_ind.get()];")
    args.append(f"CIndexer<1, {int(size <= INDEX_32_LIMIT)}> _ind")
    typedefs = "".join(f"typedef {c_type(v)} {v};\n" for v in sorted({p.type for p in params if len(p.type) == 1}))
    type_decls = "\n".join(sorted(decls)) + "\n\n" if decls else ""
    operation = "\n".join(bindings + [k.operation])
    return CUPY_HEADERS + f'''
    {type_decls}{typedefs}
    {k.preamble}
    extern "C" __global__ void {k.name}({', '.join(args)}) {{
      {k.loop_prep};
      #pragma unroll 1
      CUPY_FOR(i, _ind.size()) {{
        _ind.set(i);
        {operation};
      }}
      {k.after_loop};
    }}
    '''


def nvrtc_options(k: KernelDefinition, tools: Tools, arch: str) -> list[str]:
    """CuPy's NVRTC options for ``k``, in CuPy's order, plus ``-v`` for ptxas (a report; the code is the same)."""
    inc = tools.cupy_include
    options = [f"-I{inc}/cupy/_cccl/cub", f"-I{inc}/cupy/_cccl/thrust", f"-I{inc}/cupy/_cccl/libcudacxx"]
    options += k.options
    if not any("-std=" in o for o in k.options):
        options.append("--std=c++17")
    options += [f"-I{inc}", f"-I{tools.cuda_include}", "-ftz=true", f"-arch={arch}",
                "--device-as-default-execution-space"]
    return options + ["--ptxas-options=-v"]


# ----------------------------------------------------------------------------------------------------------------
# SASS: parsing, loops, paths
# ----------------------------------------------------------------------------------------------------------------


class Insn(NamedTuple):
    addr: int
    predicated: bool
    op: str  # base opcode: FFMA for FFMA.FTZ
    operands: str


class Function(NamedTuple):
    insns: list[Insn]
    labels: dict[str, int]  # label -> address


INSN_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)\s*(.*?)\s*;")
LABEL_RE = re.compile(r"^\s*(\.L_x_\d+):")
FUNC_RE = re.compile(r"^\s*\.text\.(\S+):\s*$")
TARGET_RE = re.compile(r"`\((\.L_x_\d+)\)")


def parse_sass(text: str) -> dict[str, Function]:
    """nvdisasm's output -> {kernel name: its instructions and labels}."""
    funcs: dict[str, Function] = {}
    cur, pending = None, []
    for line in text.splitlines():
        if m := FUNC_RE.match(line):
            cur, pending = funcs.setdefault(m.group(1), Function([], {})), []
        elif cur is None:
            continue
        elif m := LABEL_RE.match(line):
            pending.append(m.group(1))
        elif m := INSN_RE.match(line):
            addr = int(m.group(1), 16)
            cur.labels.update((label, addr) for label in pending)
            pending = []
            cur.insns.append(Insn(addr, bool(m.group(2)), m.group(3).split(".")[0], m.group(4)))
    return funcs


def branch_target(fn: Function, insn: Insn) -> int | None:
    """The address a branch jumps to; ``CALL.REL.NOINC`` to a label (not a function) is a jump too."""
    m = TARGET_RE.search(insn.operands) if insn.op in ("BRA", "CALL") else None
    return fn.labels.get(m.group(1)) if m else None


def loops(fn: Function) -> list[tuple[int, int]]:
    """The loops, as (first, last) addresses: a branch back to a label; innermost (shortest) first."""
    found = {(t, i.addr) for i in fn.insns if (t := branch_target(fn, i)) is not None and t < i.addr}
    return sorted(found, key=lambda span: (span[1] - span[0], span[0]))


def within(fn: Function, span: tuple[int, int]) -> list[Insn]:
    return [i for i in fn.insns if span[0] <= i.addr <= span[1]]


def environment_loop(fn: Function) -> tuple[int, int] | None:
    """The unrolled environment loop: of the innermost loops with 4 global loads, the first in the code (the
    loops that sum a column again for subnormal float32 gradients come after it)."""
    candidates = [s for s in loops(fn) if sum(i.op == "LDG" for i in within(fn, s)) == 4
                  and not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in loops(fn))]
    return min(candidates, default=None)


def forward_flow(fn: Function) -> tuple[list[list[int]], list[bool]]:
    """Per instruction (by index): the instructions that may follow it, back edges left out (so loops are passed
    once), calls not followed; and whether it may end the thread (EXIT)."""
    index = {i.addr: n for n, i in enumerate(fn.insns)}
    succ, ends = [], []
    for n, i in enumerate(fn.insns):
        conditional = i.predicated or bool(re.match(r"!?U?P\d", i.operands))
        target = branch_target(fn, i)
        nxt = []
        jump = i.op in ("EXIT", "RET", "BRA", "BRX", "JMP", "JMX") or target is not None
        if n + 1 < len(fn.insns) and (conditional or not jump):
            nxt.append(n + 1)
        if target is not None and target > i.addr:
            nxt.append(index[target])
        succ.append(nxt)
        ends.append(i.op == "EXIT")
    return succ, ends


def paths_through(fn: Function, anchor: int, free: set[int]) -> tuple[list[Insn], int]:
    """``(shortest, longest length)`` of the paths from the entry through the instruction at address ``anchor`` to
    an EXIT, without back edges; the instructions at the addresses ``free`` cost nothing (and are left out of the
    shortest path's instructions)."""
    succ, ends = forward_flow(fn)
    n = len(fn.insns)
    cost = [0 if i.addr in free else 1 for i in fn.insns]
    inf = float("inf")
    # Shortest and longest costs from the entry to each instruction (forward edges only: address order is a
    # topological order), and from each instruction to an EXIT.
    to_here_min, to_here_max, prev = [inf] * n, [-inf] * n, [None] * n
    to_here_min[0] = to_here_max[0] = 0
    for a in range(n):
        for b in succ[a]:
            if to_here_min[a] + cost[a] < to_here_min[b]:
                to_here_min[b], prev[b] = to_here_min[a] + cost[a], a
            to_here_max[b] = max(to_here_max[b], to_here_max[a] + cost[a])
    to_end_min, to_end_max, nxt = [inf] * n, [-inf] * n, [None] * n
    for a in reversed(range(n)):
        if ends[a]:
            to_end_min[a] = to_end_max[a] = cost[a]
        for b in succ[a]:
            if cost[a] + to_end_min[b] < to_end_min[a]:
                to_end_min[a], nxt[a] = cost[a] + to_end_min[b], b
            to_end_max[a] = max(to_end_max[a], cost[a] + to_end_max[b])
    k = next(m for m, i in enumerate(fn.insns) if i.addr == anchor)
    if to_here_min[k] == inf or to_end_min[k] == inf:
        raise RuntimeError(f"no path from the entry through /*{anchor:04x}*/ to an EXIT: the SASS is not understood")
    path, a = [], k
    while a is not None:
        path.append(a)
        a = prev[a]
    path.reverse()
    a = nxt[k]
    while a is not None:
        path.append(a)
        a = nxt[a]
    shortest = [fn.insns[a] for a in path if cost[a]]
    return shortest, int(to_here_max[k] + to_end_max[k])


# ----------------------------------------------------------------------------------------------------------------
# Counts
# ----------------------------------------------------------------------------------------------------------------

OP_CLASSES = {
    "MUFU": {"MUFU"},
    "FP32": {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FSWZADD", "FADD32I", "FMUL32I",
             "FFMA32I"},
    "FP64": {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX"},
    "INT": {"IADD3", "IADD", "IMAD", "IMUL", "LEA", "IABS", "IMNMX", "VIADD", "VIMNMX", "VIADDMNMX", "ISETP", "SEL",
            "LOP3", "LOP", "SHF", "PRMT", "POPC", "FLO", "BREV", "BMSK", "SGXT", "IMAD32I", "IADD32I", "LOP32I"},
}
CLASS_NAMES = [*OP_CLASSES, "other"]


def op_class(op: str) -> str:
    return next((name for name, ops in OP_CLASSES.items() if op in ops), "other")


def mix(insns: list[Insn], per: float = 1) -> dict[str, float]:
    counts = Counter(op_class(i.op) for i in insns)
    return {c: counts[c] / per for c in CLASS_NAMES}


class Counts(NamedTuple):
    registers: int
    spill_bytes: int  # stores + loads
    per_env: float  # 0 for a kernel without an environment loop
    env_mix: dict[str, float]
    env_branches: int  # branches inside the environment loop (both sides are counted)
    per_coordinate: int  # the shortest path (module docstring)
    per_coordinate_longest: int
    coordinate_mix: dict[str, float]


def count_kernel(fn: Function, ptxas_log: str) -> Counts:
    """The instruction counts of one kernel (module docstring)."""
    env = environment_loop(fn)
    env_insns = within(fn, env) if env else []
    loads = sum(i.op == "LDG" for i in env_insns) or 1
    # The path goes through the environment loop, or, without one, through the first store of a value.
    anchor = env[0] if env else next(i.addr for i in fn.insns if i.op == "STG")
    shortest, longest = paths_through(fn, anchor, {i.addr for i in env_insns})
    registers = re.search(r"Used (\d+) registers", ptxas_log)
    return Counts(
        registers=int(registers.group(1)) if registers else -1,
        spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log)),
        per_env=len(env_insns) / loads,
        env_mix=mix(env_insns, loads),
        env_branches=sum(i.op == "BRA" for i in env_insns) - 1 if env else 0,
        per_coordinate=len(shortest),
        per_coordinate_longest=longest,
        coordinate_mix=mix(shortest),
    )


# ----------------------------------------------------------------------------------------------------------------
# Roofline
# ----------------------------------------------------------------------------------------------------------------


class Roofline(NamedTuple):
    memory_s: float
    issue_s: float

    @property
    def bound_s(self) -> float:
        return max(self.memory_s, self.issue_s)

    @property
    def of_copy(self) -> float:
        return self.memory_s / self.bound_s


def bytes_moved(label: str, K: int, P: int, dtype: np.dtype, cdt: np.dtype) -> int:
    """Bytes a kernel reads and writes: the stack, then the value and the mask (module docstring)."""
    if label == "rescale":
        return 2 * P * cdt.itemsize  # reads and writes the value, in place
    mask = cdt.itemsize if label == "sand_mask" else 1
    return K * P * dtype.itemsize + P * (cdt.itemsize + mask)


def roofline(c: Counts, moved: int, K: int, P: int) -> Roofline:
    thread_insns = (c.per_env * K + c.per_coordinate) * P
    issue_rate = WARP * SCHEDULERS_PER_SM * SMS * CLOCK_HZ  # thread instructions per second
    return Roofline(moved / COPY_BYTES_PER_S, thread_insns / issue_rate)


def measured_times(path: Path) -> tuple[tuple[int, int, str] | None, dict[str, float]]:
    """From a bench/gpu_check.py log: ``((K, P, dtype) of its rule-kernel timings, {kernel label: best ms})``,
    the best of the rows whose label begins with the kernel's (and_mask at several tau, ...)."""
    if not path.is_file():
        return None, {}
    setting, best = None, {}
    for line in path.read_text().splitlines():
        if m := re.search(r"rule kernels: K = (\d+), P = ([\d,]+) (\w+)", line):
            setting = (int(m.group(1)), int(m.group(2).replace(",", "")), m.group(3))
        elif setting and (m := re.match(r"(\S.*?)\s+(\d+\.\d+)\s+\d+\s+\d+%\s*$", line)):
            for label, _ in KERNELS:
                if m.group(1) == label or m.group(1).startswith(label + " "):
                    best[label] = min(best.get(label, float("inf")), float(m.group(2)))
    return setting, best


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


class Case(NamedTuple):
    arch: str
    dtype: np.dtype  # the gradients'
    cdt: np.dtype  # the compute dtype
    K: int
    P: int


def compile_and_count(k: KernelDefinition, case: Case, tools: Tools, nvrtc: NVRTC, raw_elements: dict[str, int],
                      workdir: str) -> Counts:
    """Source, cubin, SASS (written to ``workdir``) and counts of one kernel."""
    src = kernel_source(k, {"T": case.dtype, "C": case.cdt}, raw_elements, case.P)
    options = nvrtc_options(k, tools, case.arch)
    stem = os.path.join(workdir, f"{k.name}.{case.dtype.name}.{case.arch}")
    Path(stem + ".cu").write_text(src)
    Path(stem + ".options").write_text("\n".join(options) + "\n")
    cubin, log = nvrtc.cubin(src, os.path.basename(stem) + ".cu", options)
    Path(stem + ".cubin").write_bytes(cubin)
    sass = subprocess.run([tools.nvdisasm, "-c", stem + ".cubin"], capture_output=True, text=True, check=True).stdout
    Path(stem + ".sass").write_text(sass)
    return count_kernel(parse_sass(sass)[k.name], log)


def count_all(rules, case: Case, tools: Tools, nvrtc: NVRTC, workdir: str) -> list[tuple[str, Counts, Roofline]]:
    """``(label, counts, roofline)`` of every kernel of KERNELS."""
    # The raw arrays: the [K, P] stack, passed flattened, and the counters.
    raw_elements = {"G": case.K * case.P, "kept": rules.KEPT_SLOTS, "bad": 1, "n_kept": 1}
    start, rows = time.monotonic(), []
    for label, k in kernel_definitions(rules, case.cdt).items():
        if time.monotonic() - start > PROGRESS_AFTER_S:
            print(f"kernel_sass.py: compiling {label} ({time.monotonic() - start:.0f} s)", file=sys.stderr)
        c = compile_and_count(k, case, tools, nvrtc, raw_elements, workdir)
        moved = bytes_moved(label, case.K, case.P, case.dtype, case.cdt)
        rows.append((label, c, roofline(c, moved, case.K, case.P)))
    return rows


def print_table(rows, measured: dict[str, float]) -> None:
    print(f"{'kernel':24s} {'regs':>4s} {'spill':>5s} {'SASS/env':>8s} {'MUFU':>5s} {'SASS/coord':>10s} "
          f"{'mem ms':>7s} {'issue ms':>8s} {'bound ms':>8s} {'of copy':>7s} {'meas ms':>7s} {'meas/bound':>10s}")
    for label, c, r in rows:
        env = (f"{c.per_env:7.2f}" + ("*" if c.env_branches else " ")) if c.per_env else f"{'-':>7s} "
        mufu = f"{c.env_mix['MUFU']:5.2f}" if c.per_env else f"{'-':>5s}"
        coord = f"{c.per_coordinate}-{c.per_coordinate_longest}"
        meas = measured.get(label)
        tail = f"{meas:7.3f} {meas / (r.bound_s * 1e3):10.2f}" if meas else f"{'-':>7s} {'-':>10s}"
        print(f"{label:24s} {c.registers:4d} {c.spill_bytes:5d} {env} {mufu} {coord:>10s} {r.memory_s * 1e3:7.3f} "
              f"{r.issue_s * 1e3:8.3f} {r.bound_s * 1e3:8.3f} {r.of_copy:7.0%} {tail}")


def print_mix(rows) -> None:
    names = " ".join(f"{c:>5s}" for c in CLASS_NAMES)
    print(f"\ninstruction mix: {'per environment':^29s} | {'per coordinate (shortest path)':^29s}")
    print(f"{'kernel':24s} {names} | {names}")
    for label, c, _ in rows:
        env = " ".join(f"{c.env_mix[n]:5.2f}" if c.per_env else f"{'-':>5s}" for n in CLASS_NAMES)
        coord = " ".join(f"{c.coordinate_mix[n]:5.0f}" for n in CLASS_NAMES)
        print(f"{label:24s} {env} | {coord}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"],
                    help="the gradients' dtype (float16 and float32 are computed in float32)")
    ap.add_argument("--K", type=int, default=16, help="environments")
    ap.add_argument("--P", type=int, default=50_000_000, help="coordinates")
    ap.add_argument("--keep-files", metavar="DIR", help="write each kernel's .cu, .options, .cubin and .sass here")
    a = ap.parse_args(argv)
    tools = find_tools()
    if tools is None:
        return 2
    try:
        if np is None:
            raise ImportError("no numpy")
        from hardtovary.accel import rules
    except ImportError as e:
        print(f"kernel_sass.py: cannot import hardtovary.accel.rules ({e}); run it in the project's environment",
              file=sys.stderr)
        return 2
    case = Case(a.arch, np.dtype(a.dtype), rules.compute_dtype(a.dtype), a.K, a.P)
    try:
        nvrtc = NVRTC(tools.nvrtc)
    except OSError as e:
        print(f"kernel_sass.py: cannot load NVRTC: {e}", file=sys.stderr)
        return 2
    print(f"# {case.arch}, NVRTC {nvrtc.version()} ({tools.nvrtc}), nvdisasm: {nvdisasm_version(tools)}")
    print(f"# CuPy headers {tools.cupy_include}, CUDA headers {tools.cuda_include}")
    print(f"# {case.dtype} gradients (computed in {case.cdt}), K = {case.K}, P = {case.P:,}; roofline: {GPU_NAME}, "
          f"{SMS} SMs x {SCHEDULERS_PER_SM} schedulers at {CLOCK_HZ / 1e9:.2f} GHz, copy "
          f"{COPY_BYTES_PER_S / 1e9:.0f} GB/s")
    if a.keep_files:
        os.makedirs(a.keep_files, exist_ok=True)
    try:
        with contextlib.nullcontext(a.keep_files) if a.keep_files else tempfile.TemporaryDirectory() as workdir:
            rows = count_all(rules, case, tools, nvrtc, workdir)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"kernel_sass.py: {e}", file=sys.stderr)
        return 1

    setting, measured = measured_times(MEASURED_LOG)
    if setting != (case.K, case.P, case.dtype.name) or case.arch != MEASURED_ARCH:
        measured = {}
    print()
    print_table(rows, measured)
    print_mix(rows)
    print("\nSASS/coord: shortest-longest path (module docstring); the bound uses the shortest. spill: bytes stored "
          "+ loaded." + ("\n*: the environment loop branches inside (a slow path, or the exit of an unrolled "
                         "loop): both sides are counted, an upper estimate."
                        if any(c.env_branches for _, c, _ in rows) else "")
          + f"\nmeas ms: {MEASURED_LOG.parent.name}/{MEASURED_LOG.name}, the best of the kernel's rows (the kernels "
          "as they were then)"
          + ("." if measured else f", shown for K = {setting[0]}, P = {setting[1]:,}, {setting[2]}, {MEASURED_ARCH}."
             if setting else " (not found)."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
