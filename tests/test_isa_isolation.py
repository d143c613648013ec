"""The compiled library runs on any x86-64 CPU: AVX2 / AVX-512 code only inside its ISA namespaces.

The kernels are compiled three times (csrc/cpu/*_base.cpp, *_avx2.cpp, *_avx512.cpp, each
with its own ``#pragma GCC target``) and picked at run time by CPUID. An inline function or
template that one of the ISA files instantiates (a ``std::vector`` member, a helper from a
shared header) is emitted in every file that uses it, and the linker keeps one copy for the
whole library: if it kept an AVX-512 copy, a CPU without AVX-512 would die of an illegal
instruction wherever the portable code calls it (review 47 pointed out the hazard; it was
not present). This test reads the built library's machine code and checks that no function
outside the ``avx2`` / ``avx512`` namespaces holds a VEX- or EVEX-encoded instruction.
"""
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import sparseticket

LIB = next(iter(Path(sparseticket.__file__).parent.glob("_C*.so")), None)

pytestmark = pytest.mark.skipif(
    LIB is None or shutil.which("objdump") is None or platform.machine() not in ("x86_64", "AMD64"),
    reason="needs the compiled x86-64 library and binutils' objdump")

FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
ISA_NAMESPACES = ("::avx2::", "::avx512::")


def _vex_functions():
    """{function: [VEX/EVEX mnemonics]} over the library's disassembly (names demangled)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(LIB)], check=True,
                          capture_output=True, text=True).stdout
    found, name = {}, None
    for line in text.splitlines():
        m = FUNCTION.match(line)
        if m:
            name = m.group(1)
            continue
        fields = line.split("\t")
        if name is None or len(fields) < 2:
            continue
        mnemonic = fields[1].strip().split(" ")[0]
        # every VEX / EVEX instruction's mnemonic starts with v (vaddps, vmovss, vzeroupper...);
        # verr / verw are the two legacy instructions that do too
        if mnemonic.startswith("v") and mnemonic not in ("verr", "verw"):
            found.setdefault(name, []).append(mnemonic)
    return found


def test_vector_extensions_stay_in_their_namespaces():
    found = _vex_functions()
    inside = [f for f in found if any(ns in f for ns in ISA_NAMESPACES)]
    outside = {f: sorted(set(m))[:5] for f, m in found.items() if not any(ns in f for ns in ISA_NAMESPACES)}
    # (the scan sees the ISA kernels themselves, so it does read the instructions it looks for)
    assert any("::avx2::" in f for f in inside) and any("::avx512::" in f for f in inside)
    assert not outside, f"AVX code outside the ISA namespaces (would run on any CPU): {outside}"
