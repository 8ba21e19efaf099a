"""Static cost of the Hopper backend's transform, without a GPU: compile, disassemble, count.

    python benchmarks/hopper_sass.py [--d 128,64] [--variants mufu,swlog,swsqrt,sw] [--out PATH]
                                     [--sass-dir DIR]

Compiles FlashAttention-4's SM90 forward and backward kernels with each variant of our score_mod
(kernels/flash_si_hopper.py) and without one ("none", plain FA4) for sm_90a on this machine, through
torch fake tensors (FA4's CPU-only compilation: FLASH_ATTENTION_ARCH, CUTE_DSL_ARCH,
FLASH_ATTENTION_NUM_SMS), keeps the cubins, disassembles them with nvdisasm and reports per kernel:
the special-function (MUFU) instructions by kind, the FP32 FMA/MUL/ADD/min-max instructions, the
warpgroup MMAs (HGMMA), registers and stack frame (spills). Counts are static (instructions in the
code, unrolled over the thread's fragment), not executed counts. --sass-dir keeps each kernel's
disassembly (addresses stripped) as DIR/<variant>_<D>_<fwd|bwd>.sass, so that a change meant to
leave the kernels alone can be diffed against the SASS before it (ptxas's backward schedule is not
deterministic: compile twice before calling a difference real). Needs `pip install -e
".[hopper]" nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump` (all PyPI); no GPU. Appends a table to
benchmarks/RESULTS.md with the date and command.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLASH_ATTENTION_ARCH", "sm_90")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
os.environ.setdefault("FLASH_ATTENTION_NUM_SMS", "132")
DUMP = Path(tempfile.mkdtemp(prefix="hopper_sass_"))  # read by the CuTe DSL at import: set first
os.environ["CUTE_DSL_KEEP"] = "cubin"
os.environ["CUTE_DSL_DUMP_DIR"] = str(DUMP)

PATTERNS = {"MUFU.EX2": r"MUFU\.EX2", "MUFU.SQRT/RSQ": r"MUFU\.(SQRT|RSQ)", "MUFU.LG2": r"MUFU\.LG2",
            "FP32 FMA/MUL/ADD/MNMX": r"\b(FFMA|FMUL|FADD|FMNMX)\b", "HGMMA": r"\bHGMMA\b"}


# the main kernels' cubin names (FA4's classes, or our subclass of its forward)
KERNEL_NAMES = {"fwd": ("flash_fwd_sm90", "TileSIForward"), "bwd": ("flash_bwd_sm90", "TileSIBackward")}


def tool(name: str) -> str:
    """Path of an NVIDIA binary tool: on PATH, or inside the nvidia-cuda-* wheels."""
    found = shutil.which(name)
    if found:
        return found
    import nvidia

    for base in nvidia.__path__:
        for path in Path(base).glob(f"*/bin/{name}"):
            return str(path)
    sys.exit(f"{name} not found: pip install nvidia-cuda-{name}")


def compile_kernels(variant: str, d: int, transform: str, dest: Path) -> None:
    """One forward and one backward compile (GQA 4/2, 4k tokens); their cubins moved to dest/."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from scaleinv_dist.kernels import flash_si_hopper as hopper

    hopper.VARIANT = variant
    opts = dict(scale=d ** -0.5, tau=10.0, causal=True, transform=transform)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, 4, 4096, d, dtype=torch.bfloat16, device="cuda")
        k, v = (torch.empty(1, 2, 4096, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        out, lse = hopper.forward(q, k, v, **opts)
        hopper.backward(out, q, k, v, out, lse, **opts)
    for cubin in DUMP.glob("*.cubin"):
        shutil.move(str(cubin), dest / cubin.name)


def disassemble(cubin: Path) -> str:
    """nvdisasm's SASS of a cubin without its /*address*/ comments."""
    sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    return re.sub(r"/\*[0-9a-f]{4,}\*/", "", sass)


def analyse(cubin: Path) -> dict:
    sass = disassemble(cubin)
    row = {name: len(re.findall(pat, sass)) for name, pat in PATTERNS.items()}
    usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                           capture_output=True, text=True).stdout
    for key in ("REG", "STACK"):
        m = re.search(rf"{key}:(\d+)", usage)
        row[key.lower()] = int(m.group(1)) if m else None
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", default="128,64")
    ap.add_argument("--variants", default="mufu,swlog,swsqrt,sw")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--sass-dir", default="", help="also write each kernel's SASS here (for diffs)")
    args = ap.parse_args(argv)
    from scaleinv_dist.kernels import flash_si_hopper as hopper

    if hopper.IMPORT_ERROR is not None:
        sys.exit(f"needs flash-attn-4 and nvidia-cutlass-dsl ({hopper.IMPORT_ERROR})")
    cols = list(PATTERNS) + ["regs", "stack bytes"]
    lines = ["| transform | variant | D | kernel | " + " | ".join(cols) + " |",
             "|" + "---|" * (4 + len(cols))]
    runs = [("none", "-", d) for d in map(int, args.d.split(","))]
    runs += [("scale_invariant", v, d) for d in map(int, args.d.split(","))
             for v in args.variants.split(",")]
    for transform, variant, d in runs:
        with tempfile.TemporaryDirectory() as tmp:
            compile_kernels("mufu" if variant == "-" else variant, d, transform,
                            Path(tmp))
            for kind in ("fwd", "bwd"):
                cubin = next(c for name in KERNEL_NAMES[kind] for c in Path(tmp).glob(f"*{name}*.cubin"))
                r = analyse(cubin)
                if args.sass_dir:
                    name = f"{'none' if variant == '-' else variant}_{d}_{kind}.sass"
                    Path(args.sass_dir).mkdir(parents=True, exist_ok=True)
                    (Path(args.sass_dir) / name).write_text(disassemble(cubin))
                lines.append(f"| {transform} | {variant} | {d} | {kind} | "
                             + " | ".join(str(r[c]) for c in PATTERNS) + f" | {r['reg']} | {r['stack']} |")
                print(lines[-1], flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv or sys.argv[1:]))
    text = (f"## {datetime.datetime.now():%Y-%m-%d %H:%M} — no GPU (sm_90a compile on the CPU), "
            f"static SASS counts\n\nCommand: `{command}`\n\n" + "\n".join(lines) + "\n")
    print(text)
    with open(args.out, "a") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
